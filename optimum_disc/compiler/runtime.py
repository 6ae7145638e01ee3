"""The runtime: executes a ``Program`` for any batch size and sequence length.

Per call: a bounded amount of host work (input checks with one device-to-host read of a few
statistics, the row bookkeeping of the prologue), then the program's kernel calls, then the
epilogue that returns outputs in the model's layout and in fp32. On a GPU, calls are replayed
through CUDA graphs captured per shape bucket (the batch, the padded length and the number of
real tokens are rounded up), kept in a bounded least-recently-used pool that shares one memory
pool. Outputs handed to the caller are fresh tensors, never overwritten by a later call.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections import OrderedDict

import torch

from optimum_disc.settings import DiscSettings

from . import torch_ops
from .program import Program

_OUTPUT_MODULE = "transformers.modeling_outputs."

# What this runtime can execute beyond plain kernel calls (lowering asks for them by name).
FEATURES = ("scalar_rows", "padded_positions", "torch_ops", "first_query_attention")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bucket(n: int, floor: int, steps: int = 4) -> int:
    """Round up to one of ``steps`` steps per power of two (at most 1/steps padding), at least
    floor."""
    if n <= floor:
        return floor
    p = 1 << (n - 1).bit_length() - 1
    step = max(p // steps, 1)
    return _round_up(n, step)


# A shape replays its graph ahead of its statistics after this many calls in a row took that
# graph, and no longer after this many wrong guesses (`CompiledModel._guess`); the table of
# shapes is cleared when it reaches _STREAKS_MAX entries.
_AHEAD_AFTER = 2
_AHEAD_MAX_MISSES = 3
_STREAKS_MAX = 4096
# The input kernel writes its statistics straight into pinned host memory (no device-to-host
# copy to launch before the call's one wait); False: into the device buffers, then copied.
_STATS_TO_HOST = True
# The input kernel of a bucket runs as a CUDA graph of its launch, which reads the caller's
# tensors from a pinned table the host fills (`prologue.InputTable`): replaying it takes a few
# microseconds of the host where a launch through Triton takes tens; False: launched each call.
_INPUT_GRAPHS = True


def _row_bucket(real_tokens: int) -> int:
    """The rows a call with padding removed computes: its real tokens rounded up to one of eight
    steps per power of two, at least 64. Every GEMM, LayerNorm and activation runs over these
    rows, so the steps are finer than the batch's and the length's (four per power of two): on
    the movie-review pass, 3.8% of the rows computed are bucket padding instead of 7.1%, for 18
    CUDA graphs instead of 13."""
    return _bucket(real_tokens, 64, steps=8)


class _Kernels:
    """Launchers of the program's kernels, imported on first use (they import Triton)."""

    def __init__(self):
        from optimum_disc.kernels import (
            attention,
            embedding,
            interpreted,
            launch,
            layernorm,
            matmul,
            pointwise,
            prologue,
        )

        self.attention, self.embedding, self.prologue = attention, embedding, prologue
        self.layernorm, self.matmul, self.pointwise = layernorm, matmul, pointwise
        self.launch = launch
        if interpreted():
            from optimum_disc.kernels import interpreter

            interpreter.round_bf16_to_nearest()


class CompiledModel:
    """A compiled encoder: call it like the original model.

    Example:
        >>> import torch, transformers
        >>> from optimum_disc import optimize, DiscSettings
        >>> cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
        >>> model = transformers.BertForSequenceClassification(cfg).eval()
        >>> compiled = optimize(model, DiscSettings(precision="fp32"))
        >>> out = compiled(input_ids=torch.randint(0, 99, (2, 7)))
        >>> out.logits.shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        program: Program,
        settings: DiscSettings,
        device: str | torch.device | None = None,
        coverage: dict | None = None,
    ):
        if not program.output_class.startswith(_OUTPUT_MODULE):
            raise ValueError(
                f"output class {program.output_class!r} is not one of transformers' model "
                "outputs; the program is corrupt or not from optimum-disc: export again."
            )
        module, _, name = program.output_class.rpartition(".")
        from transformers.utils import ModelOutput

        output_cls = getattr(importlib.import_module(module), name, None)
        if not (isinstance(output_cls, type) and issubclass(output_cls, ModelOutput)):
            raise ValueError(
                f"output class {program.output_class!r} is not a transformers ModelOutput; the "
                "program is corrupt: export the model again."
            )
        self._output_cls = output_cls
        unknown = sorted({c.kernel for c in program.calls} - set(_LAUNCH))
        if unknown:
            raise ValueError(
                f"the program calls kernels {unknown} that this optimum-disc does not have; "
                "export the model again with this version."
            )
        _check_limits(program)
        missing = sorted(set(program.meta.get("requires", ())) - set(FEATURES))
        if missing:
            raise ValueError(
                f"the program needs runtime features {missing} that this optimum-disc does not "
                "have; upgrade optimum-disc or export the model again with this version."
            )
        self.program = program
        self.settings = settings
        self.coverage = coverage or {}
        self._kernels = None
        self._lock = threading.Lock()
        self._graphs: OrderedDict = OrderedDict()
        self._inputs: dict = {}
        self._pool = None
        self._streaks: dict = {}
        self._stats_host = self._stats_ready = None
        self._input_graphs: dict = {}
        self._table, self._table_in_flight = None, False
        self.to(device or next(iter(program.weights.values())).device)

    # -- the transformers-like surface ------------------------------------------------------

    @property
    def code(self) -> str:
        return self.program.code()

    @property
    def dtype(self) -> torch.dtype:
        return self.settings.compute_dtype

    def to(self, device) -> CompiledModel:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self._wait_for_table()
        self.device = device
        self._weights = {k: v.to(device) for k, v in self.program.weights.items()}
        self.program.weights = self._weights
        self._graphs.clear()
        self._inputs.clear()
        self._streaks.clear()
        self._pool = None
        self._stats_host = self._stats_ready = None  # made again on the new device
        self._input_graphs.clear()
        self._table, self._table_in_flight = None, False
        return self

    def __repr__(self) -> str:
        return (
            f"CompiledModel({self.program.meta.get('model_class', '?')}, "
            f"precision={self.settings.precision}, calls={len(self.program.calls)}, "
            f"device={self.device})"
        )

    # -- a call -----------------------------------------------------------------------------

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        return_dict=None,
        **kwargs,
    ):
        for name in ("inputs_embeds", "head_mask", "labels", "start_positions", "end_positions"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{name} is not supported by the compiled model; pass input_ids (and compute "
                    "losses from the returned logits)."
                )
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.get(name):
                raise ValueError(f"{name}=True is not supported by the compiled model.")
        if position_ids is not None:
            raise ValueError(
                "position_ids is not supported by the compiled model; it uses positions "
                "0..seq_len-1 like the original model does when position_ids is None."
            )
        ids, mask, types = self._check_inputs(input_ids, attention_mask, token_type_ids)
        if self.device.type == "cpu" and not _kernels_on_cpu():
            raise RuntimeError(
                "this compiled model is on the CPU, but on a machine with a CUDA GPU optimum-disc "
                "compiles its kernels for the GPU: move it there (.to('cuda')). The kernels run "
                "on the CPU only through Triton's interpreter (slow, for tests), which the "
                "package turns on at import where no GPU is found, or where TRITON_INTERPRET=1 "
                "is set before optimum_disc is imported."
            )
        # All device work of a call, the copy of CPU inputs included, happens under the lock:
        # a CUDA-graph capture in progress must see no other work from this model's callers.
        with self._lock, torch.no_grad():
            dev = self.device
            ids, mask, types = (None if t is None else t.to(dev) for t in (ids, mask, types))
            outputs = self._run(ids, mask, types)
        out = self._output_cls(**outputs)
        return out if return_dict is not False else out.to_tuple()

    forward = __call__

    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        if input_ids is None:
            raise ValueError("input_ids is required.")
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask}
        tensors["token_type_ids"] = token_type_ids
        for name, t in tensors.items():
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
            if t.dtype == torch.bool and name != "attention_mask":
                raise ValueError(
                    f"{name} has dtype torch.bool; token ids must be integer tensors "
                    "(torch.long), as the tokenizer returns them."
                )
            if t.is_floating_point() or t.is_complex():
                raise ValueError(
                    f"{name} has dtype {t.dtype}; token ids and masks must be integer tensors "
                    "(torch.long), as the tokenizer returns them."
                )
            if t.dim() != 2:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [batch, seq_len].")
            if t.shape != input_ids.shape:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)} but input_ids has "
                    f"{tuple(input_ids.shape)}; they must match."
                )
        if token_type_ids is not None and "token_type_ids" not in self.program.inputs:
            raise ValueError(f"{self.program.meta.get('model_class')} takes no token_type_ids.")
        batch, seq = input_ids.shape
        if batch == 0 or seq == 0:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; the batch is empty.")
        max_pos = self.program.meta["max_position_embeddings"]
        if seq > max_pos:
            raise ValueError(
                f"sequence length {seq} exceeds max_position_embeddings={max_pos} of this "
                "model; truncate the inputs (tokenizer(..., truncation=True))."
            )
        return input_ids, attention_mask, token_type_ids

    def _check_statistics(self, stats: list[int], has_types: bool, mask) -> None:
        id_min, id_max, type_min, type_max, _, _, bad_mask = stats
        vocab, types_n = self._table_sizes
        if id_min < 0 or id_max >= vocab:
            bad = id_min if id_min < 0 else id_max
            raise ValueError(
                f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab}); use the "
                "tokenizer that belongs to this model."
            )
        if has_types and (type_min < 0 or type_max >= types_n):
            bad = type_min if type_min < 0 else type_max
            raise ValueError(
                f"token_type_ids holds {bad}, outside [0, {types_n}) (type_vocab_size)."
            )
        if bad_mask:
            values = mask[(mask != 0) & (mask != 1)]
            raise ValueError(
                f"attention_mask holds {values[0].item()}; attention_mask must hold only 0 and 1."
            )

    @functools.cached_property
    def _table_sizes(self) -> tuple[int, int]:
        """Rows of the token and segment embedding tables: the ids a call may hold."""
        meta = self.program.meta
        return meta["vocab_size"], max(meta.get("type_vocab_size", 1), 1)

    # -- execution --------------------------------------------------------------------------

    def _run(self, ids, mask, types):
        batch, seq = ids.shape
        graphs = self.settings.cuda_graphs and self.device.type == "cuda"
        if graphs:
            max_pos = self.program.meta["max_position_embeddings"]
            b_pad, s_pad = _bucket(batch, 1), min(_bucket(seq, 16), max_pos)
        else:
            b_pad, s_pad = batch, seq
        inputs = self._input_buffers(b_pad, s_pad)
        # One launch fills the bucket's input buffers and computes the statistics; reading
        # them is the call's one wait for the GPU.
        # RoBERTa-style positions count real tokens from the left; the program computes
        # s + offset, which equals that only when no padding token comes before a real one:
        # the launch counts the real tokens that break this.
        meta = self.program.meta
        positions = meta.get("positions")
        pad_id = positions["pad_token_id"] if positions is not None else None
        # With CUDA graphs the input kernel is a graph of its own too, one per bucket of the
        # input buffers and kind of inputs (`_capture_inputs`): the kernel reads the caller's
        # tensors from the table filled here.
        kind = (b_pad, s_pad, *(None if t is None else t.dtype for t in (ids, mask, types)))
        tabled = graphs and _INPUT_GRAPHS
        input_graph = self._input_graphs.get(kind) if tabled else None
        if input_graph is not None:
            self._fill_table(ids, mask, types)
            input_graph.replay()
            stats = self._host_statistics()
            stats = stats if stats is not None else inputs.stats
        else:
            if tabled:
                self._wait_for_table()
            table = self._input_table() if tabled else None
            stats = self._launch_inputs(ids, mask, types, inputs, pad_id, table)
            self._table_in_flight = tabled
        # A shape whose last calls all took the same graph, one that computes every position of
        # its bucket, replays it before the statistics are back (see `_guess`).
        guess = self._guess(batch, seq) if graphs else None
        ahead = self._graphs.get(guess) if guess is not None else None
        stats = self._read_back(stats, ahead[2] if ahead is not None else None)
        if positions is not None and stats[7]:
            raise ValueError(
                f"input_ids has the padding token {positions['pad_token_id']} before or at a "
                "real token (left padding, or padding inside a sequence); this model's "
                "positions need padding on the right (tokenizer padding_side='right')."
            )
        self._check_statistics(stats[:7], types is not None, mask)
        real_tokens, first_valid = stats[4], stats[5]
        # Removing padding is exact for every output that reads real tokens only; the first-token
        # pooling reads position 0, so a batch whose position 0 is padding keeps its padding.
        remove = (
            self.settings.remove_padding and bool(first_valid) and not meta.get("keeps_padding")
        )
        rows = _row_bucket(real_tokens) if (remove and graphs) else real_tokens
        rows = min(rows, b_pad * s_pad) if remove else b_pad * s_pad
        key = (remove, b_pad, s_pad, rows)

        if graphs:
            self._note(batch, seq, key, guess if ahead is not None else None)
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(key, inputs)
            else:
                self._graphs.move_to_end(key)
            static, outs, graph = entry
            if not (ahead is not None and key == guess):
                graph.replay()  # else it ran ahead, on these very inputs
            if tabled and input_graph is None:
                self._capture_inputs(kind, ids, mask, types, inputs, pad_id)
        else:
            static = self._static_inputs(key, inputs)
            self._derive(static)
            outs = self._execute(static)
        return self._epilogue(outs, static, batch, seq, real_tokens, remove)

    def _input_table(self):
        """The pinned table the input kernel reads the caller's tensors from (one per model:
        calls of a model run one at a time, and each waits for its input kernel)."""
        if self._table is None:
            self._table = self._kernels.prologue.InputTable(pin=True)
        return self._table

    def _wait_for_table(self) -> None:
        """Before the table is written again or dropped: the input kernel of the last call that
        used it has finished, unless that call stopped between its launch and its wait (an
        exception); wait for it then."""
        if self._table_in_flight:
            torch.cuda.synchronize(self.device)
            self._table_in_flight = False

    def _fill_table(self, ids, mask, types) -> None:
        self._wait_for_table()
        self._input_table().fill(ids, mask, types)
        self._table_in_flight = True

    def _capture_inputs(self, kind, ids, mask, types, inputs, pad_id) -> None:
        """The CUDA graph of the input kernel for this bucket of input buffers and kind of
        inputs (dtypes, mask and segment ids given or not), launched once already (compiled)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool(), capture_error_mode="thread_local"):
            self._launch_inputs(ids, mask, types, inputs, pad_id, self._input_table())
        self._input_graphs[kind] = graph

    def _launch_inputs(self, ids, mask, types, inputs, pad_id, table):
        """The input kernel over this call's inputs into the bucket's buffers; its statistics,
        on a GPU, into pinned host memory (`_host_statistics`). ``table``: the kernel reads the
        inputs from that `prologue.InputTable` (None: from its arguments)."""
        return self._kernels.prologue.prepare_inputs(
            ids,
            mask,
            types,
            inputs,
            pad_id,
            *self._table_sizes,
            stats_out=self._host_statistics(),
            table=table,
        )

    def _pinned_statistics(self) -> torch.Tensor:
        """The pinned host buffer of the statistics and the event that says they are there
        (one per model: calls of a model run one at a time)."""
        if self._stats_host is None:
            stats = len(self._kernels.prologue.STATS)
            self._stats_host = torch.zeros(stats, dtype=torch.int64, pin_memory=True)
            self._stats_ready = torch.cuda.Event()
        return self._stats_host

    def _host_statistics(self) -> torch.Tensor | None:
        """On a GPU, where the input kernel writes its statistics: the pinned host buffer."""
        if self.device.type != "cuda" or not _STATS_TO_HOST:
            return None
        return self._pinned_statistics()

    def _read_back(self, stats: torch.Tensor, ahead=None) -> list[int]:
        """The statistics on the host, waited for by an event recorded behind the input
        kernel. On a GPU that kernel wrote them into pinned host memory (`_host_statistics`),
        so there is nothing to copy; ``ahead`` (a CUDA graph) is launched between the event and
        the wait, so that the GPU runs it while the host reads and checks them."""
        if self.device.type != "cuda":
            return stats.tolist()
        if stats.device.type == "cuda":  # `_STATS_TO_HOST` off: copy them into pinned memory
            self._pinned_statistics().copy_(stats, non_blocking=True)
        self._stats_ready.record()
        if ahead is not None:
            ahead.replay()
        self._stats_ready.synchronize()
        self._table_in_flight = False
        return self._stats_host.tolist()

    def _guess(self, batch: int, seq: int):
        """The graph key to replay before this call's statistics are read back, or None.

        Reading the statistics back is a wait for the GPU, after which the host still has to
        launch the graph: on an idle GPU, a launch-bound call spends that round trip idle (at
        2 x 16 on an H200 host, the graph launched 178 us into a call of 516). A shape whose
        last ``_AHEAD_AFTER`` calls took one key launches that graph first and checks after;
        when the statistics name another key, the call replays that one too (the first run's
        outputs are never read) and the shape stops being guessed after ``_AHEAD_MAX_MISSES``
        such misses. Only keys that compute every position of their bucket are guessed: their
        buffers hold every row that any input of the bucket has, and the input kernel clamps
        the ids into the tables, so a graph that runs ahead on inputs the checks then refuse
        reads and writes nothing out of bounds.
        """
        found = self._streaks.get((batch, seq))
        if found is None:
            return None
        key, streak, misses = found
        if key is None or streak < _AHEAD_AFTER or misses >= _AHEAD_MAX_MISSES:
            return None
        return key

    def _note(self, batch: int, seq: int, key: tuple, guessed) -> None:
        """Record the key this call takes, for `_guess`."""
        _, b_pad, s_pad, rows = key
        last, streak, misses = self._streaks.get((batch, seq), (None, 0, 0))
        if guessed is not None and guessed != key:
            misses += 1
        if rows != b_pad * s_pad:
            key, streak = None, 0
        else:
            streak = streak + 1 if key == last else 1
        if len(self._streaks) >= _STREAKS_MAX and (batch, seq) not in self._streaks:
            self._streaks.clear()
        self._streaks[(batch, seq)] = (key, streak, misses)

    def _input_buffers(self, b_pad: int, s_pad: int):
        if self._kernels is None:
            self._kernels = _Kernels()
        found = self._inputs.get((b_pad, s_pad))
        if found is None:
            found = self._kernels.prologue.InputBuffers(b_pad, s_pad, self.device)
            if self.settings.cuda_graphs and self.device.type == "cuda":
                self._inputs[(b_pad, s_pad)] = found
        return found

    def _static_inputs(self, key, inputs) -> dict:
        """The buffers a bucket's kernel calls read. With padding kept they are constants of
        the bucket (and a view of the mask); with padding removed ``_derive`` fills them."""
        remove, b_pad, s_pad, rows = key
        dev = self.device
        static = {
            "shape": (b_pad, s_pad, rows),
            "input_ids": inputs.ids,
            "token_type_ids": inputs.types,
            "mask": inputs.mask,
            "key_valid": None if remove else inputs.mask.view(-1),
        }
        if remove:
            static["rows"] = torch.zeros(rows, dtype=torch.long, device=dev)
            static["cu_seqlens"] = torch.zeros(b_pad + 1, dtype=torch.int32, device=dev)
            static["first_rows"] = torch.zeros(b_pad, dtype=torch.long, device=dev)
        else:
            static["rows"] = torch.arange(rows, device=dev)
            starts = torch.arange(b_pad + 1, device=dev) * s_pad
            static["cu_seqlens"] = starts.to(torch.int32)
            static["first_rows"] = starts[:-1].clone()
        return static

    @staticmethod
    def _derive(static) -> None:
        """Rows of the real tokens and sequence boundaries, from the bucket's mask (GPU work
        only, so it is part of the captured graph)."""
        if static["key_valid"] is not None:
            return
        from optimum_disc.kernels import prologue

        # One launch: the real tokens first, in order (a stable partition of the mask); the
        # rows past them (bucket padding) point at valid positions and belong to no sequence.
        prologue.derive_rows(
            static["mask"], static["rows"], static["cu_seqlens"], static["first_rows"]
        )

    def _capture(self, key, inputs):
        static = self._static_inputs(key, inputs)
        # The first run compiles the Triton kernels and tunes GEMMs (neither may be captured):
        # the warm-up does both ahead, side by side.
        self._warm_up(static)
        self._derive(static)
        self._execute(static)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: work that other threads of the process (other models, the caller's own
        # code) issue meanwhile does not invalidate this capture.
        with torch.cuda.graph(graph, pool=self._graph_pool(), capture_error_mode="thread_local"):
            self._derive(static)
            outs = self._execute(static)
        entry = (static, outs, graph)
        self._graphs[key] = entry
        while len(self._graphs) > self.settings.max_cuda_graphs:
            self._graphs.popitem(last=False)
        return entry

    def _graph_pool(self):
        """The memory pool the model's CUDA graphs share (the buckets' and the input kernel's)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def _warm_up(self, static) -> None:
        """Before the first run of a new shape bucket on a GPU: compile every kernel the run
        launches and the candidates of every GEMM the tuner has not met yet, all side by side on
        one thread pool (`matmul.compile_pool`), then tune those GEMMs, which only times them
        now. Run one by one instead, each kernel would compile at its first launch and each GEMM
        compile its own candidates in turn (BERT-base fp16 on an H200: the six benchmark shapes'
        first calls took 23.1 s that way and 19.7 s with the warm-up; docs/performance.md).
        Programs with PyTorch ops compile the GEMM candidates only (a PyTorch op would run on
        the unwritten buffers of a pass that only compiles)."""
        if self.device.type != "cuda":
            return
        mm = self._kernels.matmul
        gemms = self._untuned_gemms(static) if self.settings.autotune else []
        with mm.compile_pool() as pooled:
            if pooled:
                for m, n, k, dtype, activation, residual in gemms:
                    mm.submit_candidates(m, n, k, dtype, self.device, activation, residual)
                if not any(call.kernel == "torch" for call in self.program.calls):
                    self._derive(static)
                    self._execute(static)
        for gemm in gemms:
            self.gemm_config(*gemm)

    def _untuned_gemms(self, static) -> list[tuple]:
        """(m, n, k, dtype, activation, residual) of each GEMM of the program whose tuned config
        for this shape bucket is not known yet, once each, as `_launch_linear` asks for them;
        GEMMs too narrow to tune (`matmul.worth_tuning`) are left out."""
        b_pad, _, rows = static["shape"]
        found = {}
        for call in self.program.calls:
            ref = call.inputs.get("weight")
            if call.kernel != "linear" or not (ref and ref.startswith("w:")):
                continue
            weight = self._weights[ref[2:]]
            m = rows if self.program.buffers[call.output].layout == "tokens" else b_pad
            gemm = (
                m,
                weight.shape[0],
                weight.shape[1],
                weight.dtype,
                call.attrs["activation"],
                call.inputs.get("residual") is not None,
            )
            if not self._kernels.matmul.worth_tuning(gemm[1]):
                continue
            key = self._gemm_key(*gemm)
            if key not in self.program.tuning and key not in _TUNED:
                found.setdefault(key, gemm)
        return list(found.values())

    def _execute(self, static) -> dict[str, torch.Tensor]:
        """The program's kernel calls over the static inputs of one shape."""
        if self._kernels is None:
            self._kernels = _Kernels()
        b_pad, s_pad, rows = static["shape"]
        env: dict[str, torch.Tensor] = {}
        values = {
            "input_ids": static["input_ids"],
            "token_type_ids": static["token_type_ids"],
            "rows": static["rows"],
            "cu_seqlens": static["cu_seqlens"],
            "key_valid": static["key_valid"],
            "first_rows": static["first_rows"],
            "attention_mask": static["mask"],
        }

        def get(ref):
            if ref is None:
                return None
            if ref.startswith("w:"):
                return self._weights[ref[2:]]
            if ref.startswith("p:"):
                return values[ref[2:]]
            return env[ref]

        for call, dead in zip(self.program.calls, self._dead_after):
            buf = self.program.buffers[call.output]
            if call.kernel == "torch":
                env[call.output] = self._run_torch(call, buf, get, b_pad, s_pad, rows)
            else:
                lead = rows if buf.layout == "tokens" else b_pad
                # A buffer of one value per row (shape []) runs as one column.
                shape = buf.shape or [1]
                out = torch.empty(lead, *shape, dtype=buf.torch_dtype, device=self.device)
                args = {k: get(v) for k, v in call.inputs.items()}
                result = _LAUNCH[call.kernel](self, args, call.attrs, out, s_pad)
                env[call.output] = result.view(lead, *buf.shape)
            for name in dead:
                del env[name]
        return {field: env[buf] for field, buf in self.program.outputs.items()}

    @functools.cached_property
    def _dead_after(self) -> list[tuple[str, ...]]:
        """Per kernel call, the buffers that no later call reads and that are no output: freed
        right after it, so that the allocator (a CUDA graph's pool during a capture) gives their
        memory to later buffers of the same call instead of keeping every intermediate alive.
        Kernels run in stream order (a PDL kernel writes only after the kernel before it has
        finished), so a later kernel never writes memory that an earlier one still reads."""
        last = {}
        for i, call in enumerate(self.program.calls):
            last[call.output] = i
            for ref in call.inputs.values():
                if ref is not None and ":" not in ref:
                    last[ref] = i
        outputs = set(self.program.outputs.values())
        dead: list[list[str]] = [[] for _ in self.program.calls]
        for name, i in last.items():
            if name not in outputs:
                dead[i].append(name)
        return [tuple(d) for d in dead]

    def _run_torch(self, call, buf, get, b_pad, s_pad, rows):
        """One ``torch`` call: row buffers in as padded ``[B, S, ...]`` views, and a result of
        the ``tokens`` or ``batch`` layout back as contiguous rows of the buffer's dtype."""
        tensors = {}
        for arg, ref in call.inputs.items():
            t = get(ref)
            if ref is not None and ":" not in ref:
                layout = self.program.buffers[ref].layout
                if layout == "tokens":
                    if t.shape[0] != b_pad * s_pad:
                        raise RuntimeError(
                            f"{call.output}: the torch op reads token rows with padding removed; "
                            "the program should keep padding (meta keeps_padding)"
                        )
                    t = t.view(b_pad, s_pad, *t.shape[1:])
            tensors[arg] = t
        result = torch_ops.run(call, tensors, b_pad, s_pad, self.device, self.program_dtype)
        if buf.layout == "free":
            return result
        lead = [rows] if buf.layout == "tokens" else [b_pad]
        return result.reshape(*lead, *buf.shape).to(buf.torch_dtype).contiguous()

    @functools.cached_property
    def program_dtype(self) -> torch.dtype:
        return getattr(torch, self.program.meta.get("precision", "float32"))

    def _epilogue(self, outs, static, batch, seq, real_tokens, remove):
        b_pad, s_pad, rows = static["shape"]
        result = {}
        for field, t in outs.items():
            layout = self.program.buffers[self.program.outputs[field]].layout
            if layout == "batch":
                result[field] = t[:batch].float()
            elif remove:
                full = t.new_zeros((b_pad * s_pad, *t.shape[1:]), dtype=torch.float32)
                full.index_copy_(0, static["rows"][:real_tokens], t[:real_tokens].float())
                result[field] = full.view(b_pad, s_pad, *t.shape[1:])[:batch, :seq].clone()
            else:
                result[field] = t.view(b_pad, s_pad, *t.shape[1:])[:batch, :seq].float()
                if self.settings.remove_padding:
                    # This batch kept its padding (position 0 was padding somewhere); the
                    # documented output at padding positions is still zeros.
                    keep = static["mask"][:batch, :seq].view(batch, seq, *[1] * (t.dim() - 1))
                    result[field] = result[field] * keep
            if result[field].data_ptr() == t.data_ptr():
                result[field] = result[field].clone()
        return result

    # -- GEMM block shapes ------------------------------------------------------------------

    def gemm_config(
        self,
        m: int,
        n: int,
        k: int,
        dtype: torch.dtype,
        activation: str | None = None,
        residual: bool = False,
    ):
        """Block shapes of one GEMM: saved with the program per GPU model, shape bucket and
        epilogue, so an artifact loaded on another GPU tunes (or takes the defaults) afresh."""
        mm = self._kernels.matmul
        key = self._gemm_key(m, n, k, dtype, activation, residual)
        found = self.program.tuning.get(key) or _TUNED.get(key)
        if found is not None:
            self.program.tuning[key] = found
            return mm.GemmConfig.from_dict(found)
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        # A pass that only compiles (`_warm_up`) times nothing; the tuning follows it.
        compiling = self._kernels.launch.compiling_only()
        tunes = self.settings.autotune and mm.worth_tuning(n)
        if tunes and self.device.type == "cuda" and not (capturing or compiling):
            config = mm.tune(m, n, k, dtype, self.device, activation, residual)
            self.program.tuning[key] = _TUNED[key] = config.to_dict()
            return config
        return mm.default_config(m, n, k, dtype)

    def _gemm_key(self, m, n, k, dtype, activation, residual) -> str:
        """The key of a GEMM's tuned config: GPU model, shape, dtype, epilogue, row bucket."""
        key = f"{_device_name(self.device)}|{n}x{k}:{str(dtype).removeprefix('torch.')}"
        key += f":{activation or 'none'}{'+residual' if residual else ''}"
        return key + f":m{self._kernels.matmul.m_bucket(m)}"


# Tuned GEMM configs of this process, shared by every model (a second precision or a second
# model with the same shapes does not tune again).
_TUNED: dict[str, dict] = {}


def _kernels_on_cpu() -> bool:
    """Whether this process can run the kernels on the CPU: Triton's interpreter is on (which
    `optimum_disc` decides at import: on where no CUDA GPU is found)."""
    from optimum_disc.kernels import interpreted

    return interpreted()


@functools.cache
def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm{major}{minor}"


def _check_limits(program: Program) -> None:
    """The id and length limits of ``meta`` must lie inside the embedding tables, or a
    tampered program would let the kernels read past them."""
    meta = program.meta
    for call in program.calls:
        if call.kernel != "embed_layernorm":
            continue
        rows = {
            arg: program.weights[ref[2:]].shape[0]
            for arg, ref in call.inputs.items()
            if ref and ref.startswith("w:") and arg in ("word", "position", "token_type")
        }
        limits = {
            "word": meta.get("vocab_size", 0),
            "position": meta.get("max_position_embeddings", 0)
            + call.attrs.get("position_offset", 0),
            "token_type": meta.get("type_vocab_size", 0),
        }
        for arg, n in rows.items():
            if limits[arg] > n:
                raise ValueError(
                    f"the program allows {limits[arg]} rows of the {arg} embedding table but it "
                    f"has {n}; the program is corrupt: export the model again."
                )


def _launch_linear(model, a, attrs, out, seq):
    x, w = a["x"], a["weight"]
    config = model.gemm_config(
        x.shape[0],
        w.shape[0],
        w.shape[1],
        w.dtype,
        attrs["activation"],
        a["residual"] is not None,
    )
    return model._kernels.matmul.linear(
        x,
        w,
        a["bias"],
        activation=attrs["activation"],
        residual=a["residual"],
        out=out,
        config=config,
    )


def _launch_layer_norm(model, a, attrs, out, seq):
    return model._kernels.layernorm.layer_norm(
        a["x"], a["weight"], a["bias"], attrs["eps"], residual=a["residual"], out=out
    )


def _launch_embed(model, a, attrs, out, seq):
    return model._kernels.embedding.embed_layernorm(
        a["input_ids"],
        a["word"],
        a["position"],
        a["ln_weight"],
        a["ln_bias"],
        attrs["eps"],
        rows=a["rows"],
        token_type_ids=a["token_type_ids"],
        token_type=a["token_type"],
        position_offset=attrs["position_offset"],
        out=out,
    )


def _launch_attention(model, a, attrs, out, seq):
    width = attrs["num_heads"] * attrs["head_dim"]
    q, k, v = (a[n][:, off : off + width] for n, off in zip("qkv", attrs["offsets"]))
    return model._kernels.attention.attention(
        q,
        k,
        v,
        a["cu_seqlens"],
        seq,
        attrs["num_heads"],
        attrs["head_dim"],
        attrs["scale"],
        key_valid=a["key_valid"],
        out=out,
        first_only=attrs.get("first_only", False),
    )


def _launch_first_token(model, a, attrs, out, seq):
    return torch.index_select(a["x"], 0, a["first_rows"], out=out)


def _launch_pointwise(model, a, attrs, out, seq):
    inputs = [a[f"in{i}"] for i in range(len(a))]
    return model._kernels.pointwise.pointwise(attrs["expr"], inputs, out=out)


_LAUNCH = {
    "linear": _launch_linear,
    "layer_norm": _launch_layer_norm,
    "embed_layernorm": _launch_embed,
    "attention": _launch_attention,
    "first_token": _launch_first_token,
    "pointwise": _launch_pointwise,
    "torch": None,  # run by CompiledModel._run_torch
}
