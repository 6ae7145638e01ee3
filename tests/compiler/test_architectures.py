"""The BERT family beyond BERT: tiny random models of each architecture compiled and compared
with eager PyTorch on fresh random inputs, every output element; the passes these architectures
need, on the smallest graphs that show them; and the message that an architecture which does
not compile gets.

Tolerances: fp32 within 1e-4 of eager, relative to the output's scale (its largest magnitude,
at least 1); fp16 and bf16 within twice the error of the eager model run in that precision, plus
one half-precision ulp at the output's scale.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from optimum_disc import DiscSettings, optimize
from optimum_disc.compiler import ops
from optimum_disc.compiler.lower import UnsupportedGraph, runtime_features
from optimum_disc.compiler.passes.activations import recognise_gelu
from optimum_disc.compiler.passes.cleanup import drop_noops
from optimum_disc.compiler.passes.columns import split_columns
from optimum_disc.compiler.passes.embeddings import fuse_embeddings
from optimum_disc.compiler.passes.gemm_epilogue import fuse_gemm_epilogue
from optimum_disc.compiler.passes.layer_norm import fuse_layer_norm
from optimum_disc.compiler.passes.positions import padded_positions

from .graphs import assert_same_function, export_graph, targets

aten = torch.ops.aten
FP32_RTOL = 1e-4
VOCAB = 99
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
    num_labels=3,
)
# RoBERTa numbers positions from padding_idx + 1: 66 rows hold 64 positions.
ROBERTA = {**TINY, "pad_token_id": 1, "max_position_embeddings": 66, "type_vocab_size": 1}
ARCHS = {
    "distilbert": (
        "DistilBert",
        dict(
            vocab_size=VOCAB,
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=37,
            num_labels=3,
            max_position_embeddings=64,
        ),
    ),
    # Factorised embeddings: a projection from 16 to the hidden size after the LayerNorm.
    "electra": ("Electra", {**TINY, "embedding_size": 16}),
    # Factorised embeddings, and three layers that share one set of weights.
    "albert": ("Albert", {**TINY, "embedding_size": 16, "num_hidden_layers": 3}),
    "roberta": ("Roberta", ROBERTA),
    "xlm-roberta": ("XLMRoberta", ROBERTA),
    "camembert": ("Camembert", ROBERTA),
    # Relative position bias: T5-style buckets of j - i, one learned value per head.
    "mpnet": ("MPNet", {**ROBERTA, "type_vocab_size": 0}),
    # Disentangled attention as in deberta-v3: c2p and p2c scores over log buckets of i - j.
    "deberta-v2": (
        "DebertaV2",
        {
            **TINY,
            "relative_attention": True,
            "position_buckets": 8,
            "max_relative_positions": -1,
            "pos_att_type": ["p2c", "c2p"],
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
            "position_biased_input": False,
            "type_vocab_size": 0,
        },
    ),
    # Rotary embeddings, GeGLU, and local attention (window 8) in every other layer.
    "modernbert": (
        "ModernBert",
        {
            **TINY,
            "num_hidden_layers": 3,
            "global_attn_every_n_layers": 2,
            "local_attention": 8,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "cls_token_id": 2,
            "sep_token_id": 3,
        },
    ),
}
# Architectures whose attention runs as PyTorch ops inside the program (``torch`` calls).
TORCH_OPS = ("mpnet", "deberta-v2", "modernbert")
HEADS = {
    "base": "Model",
    "seq-cls": "ForSequenceClassification",
    "token-cls": "ForTokenClassification",
    "mlm": "ForMaskedLM",
    "qa": "ForQuestionAnswering",
}
# Architectures whose positions count the tokens that are not padding.
PADDED_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet")
# Architectures whose padding tokens, as queries, attend to every position of the input alike
# (DeBERTa-v2 masks their scores with the dtype's minimum, so their softmax is uniform): with
# padding kept, their outputs depend on how long the padded input is, and on a GPU the runtime
# pads each call further, to its shape bucket (7 -> 16 positions). Real tokens are unaffected.
QUERY_MASKED = ("deberta-v2",)


def _model(arch: str, head: str, device, **overrides) -> nn.Module:
    prefix, config = ARCHS[arch]
    cfg = getattr(transformers, f"{prefix}Config")(**{**config, **overrides})
    return getattr(transformers, prefix + HEADS[head])(cfg).eval().to(device)


def _inputs(model, batch, seq, device, padding="random") -> dict[str, torch.Tensor]:
    """Random ids, a mask and (when the model takes them) token types. Padding positions hold
    the pad token, and real tokens never do (as a tokenizer makes them)."""
    config = model.config
    pad = config.pad_token_id or 0
    ids = torch.randint(0, VOCAB - 1, (batch, seq), device=device)
    ids[ids >= pad] += 1  # any id but the pad token
    lengths = torch.randint(1, seq + 1, (batch,), device=device)
    lengths[0] = seq
    pos = torch.arange(seq, device=device)[None]
    if padding == "right":
        mask = pos < lengths[:, None]
    elif padding == "random":
        mask = torch.rand(batch, seq, device=device) > 0.3
        mask[:, 0] = True
    else:
        mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    ids[~mask] = pad
    inputs = {"input_ids": ids, "attention_mask": mask.long()}
    if getattr(config, "type_vocab_size", 0):
        inputs["token_type_ids"] = torch.randint(
            0, config.type_vocab_size, (batch, seq), device=device
        )
    return inputs


def _compare(arch, out, ref, mask, remove_padding, rtol, seed):
    for field in ref:
        got, want = out[field], ref[field].float()
        assert got.dtype == torch.float32, field
        assert got.shape == want.shape, f"{field}: {tuple(got.shape)} vs {tuple(want.shape)}"
        if got.dim() >= 2 and got.shape[:2] == mask.shape:
            pad = mask == 0
            if remove_padding:
                assert torch.all(got[pad] == 0), f"{field}: padding positions must be zeros"
            if remove_padding or arch in PADDED_POSITIONS or arch in QUERY_MASKED:
                # With padding kept, RoBERTa-style models give padding tokens position
                # padding_idx and the program s + padding_idx + 1, and DeBERTa's padding tokens
                # attend to every position of the shape bucket: only real tokens compare.
                got, want = got[~pad], want[~pad]
        scale = want.abs().max().clamp(min=1.0)
        err = (got - want).abs().max() / scale
        assert err <= rtol, f"{arch} {field}: max |diff| / scale = {err:.3g} > {rtol} (seed {seed})"


# -- the inference graph without re-tracing --------------------------------------------------------

# Architectures whose exported graph holds in-place or other composite ops: decomposed by
# re-tracing (``run_decompositions``) as before.
RETRACED = ("mpnet", "deberta-v2", "modernbert")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_inference_graph_in_place_gives_the_same_program(arch, monkeypatch):
    """`capture._to_inference_ir` rewrites the exported graph into the one that
    ``run_decompositions`` gives by re-tracing it, or leaves it alone: either way the compiled
    program (kernels, attributes, buffers, weights) is the same as with the re-tracing."""
    import importlib

    # (the package's ``capture`` is the function; the module holds `_to_inference_ir`)
    capture_module = importlib.import_module("optimum_disc.compiler.capture")

    model = _model(arch, "token-cls" if arch != "distilbert" else "seq-cls", "cpu")
    real = capture_module._to_inference_ir
    taken = []
    monkeypatch.setattr(
        capture_module, "_to_inference_ir", lambda ep: taken.append(real(ep)) or taken[-1]
    )
    program = optimize(model, DiscSettings(precision="fp16")).program
    monkeypatch.setattr(capture_module, "_to_inference_ir", lambda ep: False)
    retraced = optimize(model, DiscSettings(precision="fp16")).program
    assert taken == [arch not in RETRACED]
    assert program.to_json() == retraced.to_json()
    assert program.weights.keys() == retraced.weights.keys()
    for name, weight in program.weights.items():
        assert torch.equal(weight, retraced.weights[name]), name


# -- fp32 parity, one compile per (architecture, head) ------------------------------------------

CASES = [
    ("distilbert", "seq-cls", True),
    ("distilbert", "mlm", False),
    ("electra", "seq-cls", True),
    ("electra", "token-cls", False),
    ("albert", "seq-cls", True),
    ("albert", "mlm", False),
    ("roberta", "seq-cls", True),
    ("roberta", "token-cls", False),
    ("xlm-roberta", "seq-cls", True),
    ("camembert", "base", True),
    ("mpnet", "seq-cls", True),
    ("mpnet", "mlm", False),
    ("deberta-v2", "seq-cls", True),
    ("deberta-v2", "token-cls", False),
    ("modernbert", "seq-cls", True),
    ("modernbert", "mlm", False),
]


@pytest.mark.parametrize(
    ("arch", "head", "remove_padding"),
    CASES,
    ids=[f"{a}-{h}-{'unpadded' if r else 'padded'}" for a, h, r in CASES],
)
def test_fp32_matches_eager(arch, head, remove_padding, device, seed):
    model = _model(arch, head, device)
    compiled = optimize(model, DiscSettings(precision="fp32", remove_padding=remove_padding))
    # RoBERTa-style positions are s + padding_idx + 1 for right padding only.
    paddings = ("right", "none") if arch in PADDED_POSITIONS else ("right", "random", "none")
    for (batch, seq), padding in zip(((3, 7), (1, 1), (2, 17)), paddings * 2):
        inputs = _inputs(model, batch, seq, device, padding)
        with torch.no_grad():
            ref = model(**inputs)
        out = compiled(**inputs)
        _compare(arch, out, ref, inputs["attention_mask"], remove_padding, FP32_RTOL, seed)


def test_deberta_v2_real_tokens_do_not_depend_on_the_shape_bucket(device, seed):
    """On a GPU a call runs padded further, to its shape bucket (length 7 -> 16): DeBERTa's
    padding tokens then attend to more positions than in eager and their outputs change; its
    real tokens must not. The same input padded to the bucket by hand shows it on the CPU too."""
    from optimum_disc.compiler.runtime import _bucket

    model = _model("deberta-v2", "token-cls", device)
    compiled = optimize(model, DiscSettings(precision="fp32", remove_padding=False))
    inputs = _inputs(model, 3, 7, device, "right")
    with torch.no_grad():
        ref = model(**inputs)
    extra = _bucket(7, 16) - 7
    padded = {
        name: torch.nn.functional.pad(t, (0, extra), value=model.config.pad_token_id or 0)
        for name, t in inputs.items()
    }
    padded["attention_mask"][:, 7:] = 0
    out = compiled(**padded)
    cut = {field: out[field][:, :7] for field in ref}
    _compare("deberta-v2", cut, ref, inputs["attention_mask"], False, FP32_RTOL, seed)
    pad = inputs["attention_mask"] == 0
    assert pad.any(), "the inputs have no padding to compare"
    moved = (cut["logits"][pad] - ref["logits"][pad]).abs().max() / ref["logits"].abs().max()
    assert moved > 1e-5, f"padding outputs did not change ({moved:.3g}): the test is moot"


@pytest.mark.parametrize(
    "arch", ["distilbert", "electra", "albert", "roberta", "mpnet", "deberta-v2", "modernbert"]
)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_within_twice_eager_half_error(arch, precision, device, seed):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = _model(arch, "base", device)
    half = _model(arch, "base", device).to(dtype)
    half.load_state_dict(model.state_dict())
    compiled = optimize(model, precision=precision, remove_padding=False)
    inputs = _inputs(model, 4, 13, device, "right")
    with torch.no_grad():
        ref, ref_half = model(**inputs), half(**inputs)
    out = compiled(**inputs)
    valid = inputs["attention_mask"].bool()
    for field in ref:
        rows = valid if out[field].dim() == 3 else slice(None)
        want = ref[field][rows]
        ours = (out[field][rows] - want).abs().max()
        eager = (ref_half[field][rows].float() - want).abs().max()
        floor = torch.finfo(dtype).eps * want.abs().max()
        assert ours <= 2 * eager + floor, (
            f"{arch} {precision} {field}: ours {ours:.3g} vs eager half {eager:.3g} (seed {seed})"
        )


# -- what each architecture needs ---------------------------------------------------------------


def test_albert_layers_share_one_copy_of_their_weights(device):
    model = _model("albert", "seq-cls", device)
    compiled = optimize(model, precision="fp32")
    calls = compiled.program.calls
    attention = [c for c in calls if c.kernel == "attention"]
    assert len(attention) == 3
    # One packed QKV weight (and one of each other layer weight) serves the three layers.
    qkv_outputs = {a.inputs["q"] for a in attention}
    qkv = {c.inputs["weight"] for c in calls if c.output in qkv_outputs}
    assert len(qkv) == 1
    eager_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert compiled.program.weight_bytes() <= eager_bytes
    # ALBERT's gelu_new, written out op by op, runs in the GEMM epilogue of each layer.
    assert not any(c.kernel == "pointwise" for c in calls)
    assert sum(c.attrs.get("activation") == "gelu_tanh" for c in calls) == 3


def test_electra_projects_its_embeddings(device):
    compiled = optimize(_model("electra", "base", device), precision="fp32")
    first, second = compiled.program.calls[:2]
    assert first.kernel == "embed_layernorm"
    assert compiled.program.buffers[first.output].shape == [16]
    assert second.kernel == "linear" and second.inputs["x"] == first.output
    assert compiled.program.buffers[second.output].shape == [32]


def test_the_runtime_has_the_features_lowering_asks_for():
    assert runtime_features() >= {"scalar_rows", "padded_positions"}


def test_roberta_refuses_inputs_whose_positions_differ(device, seed):
    model = _model("roberta", "seq-cls", device)
    compiled = optimize(model, precision="fp32")
    pad = model.config.pad_token_id
    good = _inputs(model, 3, 8, device, "none")
    good["attention_mask"][1, 5:] = 0
    good["attention_mask"][2, 3:] = 0
    good["input_ids"][good["attention_mask"] == 0] = pad
    left = {k: v.flip(1) for k, v in good.items()}
    inside = {k: v.clone() for k, v in good.items()}
    inside["input_ids"][0, 3] = pad
    for bad in (left, inside):
        with pytest.raises(ValueError, match="pad"):
            compiled(**bad)
    with torch.no_grad():
        ref = model(**good)
    _compare("roberta", compiled(**good), ref, good["attention_mask"], True, FP32_RTOL, seed)


def test_roberta_program_records_its_positions(device):
    compiled = optimize(_model("roberta", "base", device), precision="fp32")
    meta = compiled.program.meta
    assert meta["positions"] == {"pad_token_id": 1, "offset": 2}
    assert meta["requires"] == ["padded_positions"]
    assert meta["max_position_embeddings"] == 64  # 66 rows from offset 2
    assert compiled.program.calls[0].attrs["position_offset"] == 2
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=64"):
        compiled(input_ids=torch.full((1, 65), 5, device=device))


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_question_answering_head(arch, device, seed):
    if arch == "bert":
        cfg = transformers.BertConfig(**{**TINY, "num_labels": 2})
        model = transformers.BertForQuestionAnswering(cfg).eval().to(device)
    else:
        model = _model(arch, "qa", device, num_labels=2)
    compiled = optimize(model, precision="fp32")
    program = compiled.program
    gemms = [c for c in program.calls if c.kernel == "linear"]
    # One GEMM per logit over one row of the head's weight, written as one value per token.
    for field in ("start_logits", "end_logits"):
        assert program.buffers[program.outputs[field]].shape == []
    assert {program.weights[c.inputs["weight"][2:]].shape[0] for c in gemms[-2:]} == {1}
    for (batch, seq), padding in (((3, 7), "random"), ((1, 1), "none"), ((2, 17), "right")):
        inputs = _inputs(model, batch, seq, device, padding)
        with torch.no_grad():
            ref = model(**inputs)
        out = compiled(**inputs)
        _compare(arch, out, ref, inputs["attention_mask"], True, FP32_RTOL, seed)


# -- architectures whose attention runs as PyTorch ops --------------------------------------------


@pytest.mark.parametrize("arch", TORCH_OPS)
def test_torch_ops_are_reported_and_keep_padding(arch, device, seed):
    """What the kernels do not cover runs as ``torch`` calls: the program says which, the
    coverage gives the share of FLOPs in our kernels (below 1, above 0), the program keeps the
    padding of each batch, and it survives a JSON round trip."""
    model = _model(arch, "seq-cls", device)
    compiled = optimize(model, precision="fp32")
    program, cov = compiled.program, compiled.coverage
    torch_calls = [c for c in program.calls if c.kernel == "torch"]
    assert torch_calls and program.meta["keeps_padding"]
    assert "torch_ops" in program.meta["requires"]
    assert sum(cov["fallback_ops"].values()) == len(torch_calls)
    assert 0.0 < cov["flops_share_in_our_kernels"] < 1.0, cov["flops_per_kernel"]
    assert {"linear", "layer_norm"} <= set(cov["kernel_calls"])
    assert "torch.aten." in compiled.code
    again = type(program).from_json(program.to_json(), program.weights)
    reloaded = type(compiled)(again, compiled.settings, device=device)
    inputs = _inputs(model, 2, 9, device, "right")
    with torch.no_grad():
        ref = model(**inputs)
    for out in (compiled(**inputs), reloaded(**inputs)):
        _compare(arch, out, ref, inputs["attention_mask"], True, FP32_RTOL, seed)


def test_a_torch_call_naming_other_code_is_refused():
    model = _model("modernbert", "base", "cpu")
    program = optimize(model, precision="fp32").program
    doc = program.to_dict()
    call = next(c for c in doc["calls"] if c["kernel"] == "torch")
    for bad, why in (
        ("os.system", "is not an ATen or optimum-disc operator"),
        ("aten.no_such_op.default", "does not exist"),
        ("aten.nonzero.default", "reads data back to the host"),
        ("disc.__init__", "is not an optimum-disc operator"),
    ):
        call["attrs"]["op"] = bad
        with pytest.raises(ValueError, match=why):
            type(program).from_dict(doc, program.weights)
    call["attrs"]["op"] = "aten.add.Tensor"
    call["attrs"]["args"] = [{"sym": "__import__('os')"}]
    with pytest.raises(ValueError, match="not allowed"):
        type(program).from_dict(doc, program.weights)


def test_sliding_window_masks_are_not_taken_for_padding_masks(device, seed):
    """ModernBERT's local layers see 8 tokens each way: at short lengths their mask looks like a
    key-padding mask. The pass tests masks at the longest length, so only global layers' masks
    become padding masks; with sequences longer than the window the outputs still match."""
    model = _model("modernbert", "base", device)
    compiled = optimize(model, precision="fp32")
    inputs = _inputs(model, 2, 40, device, "right")
    with torch.no_grad():
        ref = model(**inputs)
    _compare("modernbert", compiled(**inputs), ref, inputs["attention_mask"], True, 1e-4, seed)


UNSUPPORTED = {
    "mpnet": (lambda: _model("mpnet", "seq-cls", "cpu"), "relative position bias"),
    "deberta-v2": (lambda: _model("deberta-v2", "seq-cls", "cpu"), "disentangled attention"),
    "modernbert": (lambda: _model("modernbert", "seq-cls", "cpu"), "rotary position embeddings"),
}


@pytest.mark.parametrize("arch", list(UNSUPPORTED))
def test_without_torch_fallback_the_message_says_what_is_missing(arch):
    make, reason = UNSUPPORTED[arch]
    with pytest.raises(UnsupportedGraph) as info:
        optimize(make().eval(), torch_fallback=False)
    message = str(info.value)
    assert f"(model_type '{arch}') cannot be compiled with torch_fallback=False" in message
    assert reason in message
    assert "torch_fallback=True (the default)" in message
    assert "The compiler stopped at:" in message
    assert "optimum-disc compiles BERT, DistilBERT, ELECTRA, ALBERT" in message
    assert "docs/models.md" in message


class _BranchesOnLength(transformers.BertModel):
    """Python control flow on the sequence length: torch.export cannot keep it symbolic."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        if input_ids.shape[1] > 8:
            kwargs["output_hidden_states"] = False
        return super().forward(input_ids, attention_mask, token_type_ids, **kwargs)


def test_a_graph_that_export_cannot_keep_symbolic_gets_a_clear_message():
    """Export's own refusal (a guard that really specialises the length) is an UnsupportedGraph."""
    model = _BranchesOnLength(transformers.BertConfig(**TINY)).eval()
    with pytest.raises(UnsupportedGraph) as info:
        optimize(model)
    message = str(info.value)
    assert "(model_type 'bert') cannot be compiled: torch.export" in message, message
    assert "could not trace it with symbolic batch and sequence sizes" in message, message
    assert "Constraints violated (seq)" in message, message
    assert isinstance(info.value.__cause__, torch._dynamo.exc.UserError)


def test_multiple_choice_is_refused_before_export(device):
    model = transformers.BertForMultipleChoice(transformers.BertConfig(**TINY)).eval()
    with pytest.raises(UnsupportedGraph, match=r"\[batch, choices, seq\].*compile the base"):
        optimize(model)


# -- the passes, on the smallest graphs that show them ------------------------------------------

H = 16


def _small_inputs(batch=3, seq=6):
    ids = torch.randint(0, 50, (batch, seq))
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


class Logits(nn.Module):
    """A GEMM whose columns are taken apart in every way the columns pass knows."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(50, H), nn.Linear(H, 5)

    def forward(self, input_ids, attention_mask):
        logits = self.head(self.emb(input_ids))
        start, end = logits[..., :2].split(1, dim=-1)
        a, b = logits.split([3, 2], dim=-1)
        return (
            start.squeeze(-1).contiguous(),
            end.squeeze(-1),
            logits[..., 4],
            a,
            b * 2,
            logits[:, :, 1:3],
        )


def test_split_columns_gives_one_gemm_per_part(seed):
    g = export_graph(Logits(), _small_inputs())
    before = g.copy()
    g = split_columns(fuse_gemm_epilogue(drop_noops(g)))
    left = set(targets(g))
    assert not left & {aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor}
    assert not left & {aten.select.int}
    linears = [n for n in g.graph.nodes if n.target is ops.linear]
    widths = sorted(g.constant(n.args[1]).shape[0] for n in linears)
    assert widths == [1, 1, 1, 2, 2, 3], widths
    assert_same_function(before, g, _small_inputs(2, 9))


class RobertaEmbeddings(nn.Module):
    def __init__(self, pad=1, count_padding=False):
        super().__init__()
        self.pad, self.count_padding = pad, count_padding
        self.word = nn.Embedding(50, H, padding_idx=pad)
        self.pos = nn.Embedding(40, H, padding_idx=pad)
        self.ln = nn.LayerNorm(H)

    def forward(self, input_ids, attention_mask):
        real = input_ids.ne(self.pad).int()
        count = torch.cumsum(real, dim=1).type_as(real)
        positions = (count if self.count_padding else count * real).long() + self.pad
        return (self.ln(self.word(input_ids) + self.pos(positions)),)


def _padded_ids(batch, seq, pad=1):
    ids = torch.randint(2, 50, (batch, seq))
    ids[0, -2:] = pad
    ids[-1, :2] = pad
    ids[1, seq // 2] = pad
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def test_padded_positions_are_recognised_and_fused(seed):
    g = export_graph(RobertaEmbeddings(), _small_inputs(3, 8))
    before = g.copy()
    g = fuse_embeddings(fuse_layer_norm(padded_positions(drop_noops(g))))
    assert targets(g) == [ops.embed_layernorm]
    node = next(n for n in g.graph.nodes if n.target is ops.embed_layernorm)
    assert node.args[8:] == (2, 1)  # position_offset, padding_idx
    # Exact for any placement of padding (the op's meaning counts tokens like the model does).
    assert_same_function(before, g, _padded_ids(4, 11))


def test_other_position_formulas_are_left_alone(seed):
    g = export_graph(RobertaEmbeddings(count_padding=True), _small_inputs(3, 8))
    g = fuse_embeddings(fuse_layer_norm(padded_positions(drop_noops(g))))
    assert ops.padded_positions not in targets(g)
    assert ops.embed_layernorm not in targets(g)


class GeluNew(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(50, H), nn.Linear(H, 24)

    def forward(self, input_ids, attention_mask):
        x = self.fc(self.emb(input_ids))
        c = (2.0 / torch.pi) ** 0.5
        return (0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3.0)))),)


class NotGelu(GeluNew):
    def forward(self, input_ids, attention_mask):
        x = self.fc(self.emb(input_ids))
        return (0.5 * x * (1.0 + torch.tanh(0.8 * (x + 0.05 * torch.pow(x, 3.0)))),)


def test_gelu_written_out_becomes_the_gemm_activation(seed):
    g = export_graph(GeluNew(), _small_inputs())
    before = g.copy()
    g = fuse_gemm_epilogue(recognise_gelu(drop_noops(g)))
    assert targets(g) == [aten.embedding.default, ops.linear]
    node = next(n for n in g.graph.nodes if n.target is ops.linear)
    assert node.args[3] == "gelu_tanh"
    assert_same_function(before, g, _small_inputs(2, 9))
    # A chain that is not GELU stays as it is.
    g = recognise_gelu(drop_noops(export_graph(NotGelu(), _small_inputs())))
    assert aten.gelu.default not in targets(g)
    assert aten.tanh.default in targets(g)


# -- capture: one program for every batch and sequence length -----------------------------------


def _symbolic_inputs(graph) -> bool:
    shapes = [n.meta["val"].shape for n in graph.gm.graph.nodes if n.name in graph.inputs]
    return bool(shapes) and all(isinstance(d, torch.SymInt) for s in shapes for d in s)


@pytest.mark.parametrize("buckets", [8, 256])
def test_deberta_v2_is_captured_with_symbolic_batch_and_sequence(buckets):
    """On torch 2.11 export refused DeBERTa-v2 ("Constraints violated (seq)!"): the view that
    merges batch and heads left a ``Min`` of two strides that 2.11 could not simplify."""
    from optimum_disc.compiler.capture import capture

    graph = capture(_model("deberta-v2", "seq-cls", "cpu", position_buckets=buckets))
    assert _symbolic_inputs(graph)


def test_sizes_that_can_be_ordered_lose_their_min_and_max():
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from optimum_disc.compiler.capture import _ordered_sym_min_max

    env = ShapeEnv()
    s = env.create_symintnode(env.create_symbol(11, ConstantSource("s")), hint=11)
    sym_min, sym_max = torch.sym_min, torch.sym_max
    with _ordered_sym_min_max():
        assert str(torch.sym_min(16 * s, 32 * s)) == str(16 * s)
        assert str(torch.sym_min(s * s, 2 * s * s)) == str(s * s)
        assert str(torch.sym_max(s, 1)) == str(s)
        assert "Min" in str(torch.sym_min(s, 16)), "sizes that cannot be ordered stay symbolic"
        assert torch.sym_min(3, 5) == 3 and torch.sym_max(3, 5) == 5
    assert (torch.sym_min, torch.sym_max) == (sym_min, sym_max)
    assert env.guards == [], "ordering two sizes adds no guard"


def test_a_constraint_violation_is_exported_again_with_ordered_min_and_max(monkeypatch):
    """What torch 2.11 does with DeBERTa-v2, on any torch: the first export reports a
    constraint violation, the second runs with ``_ordered_sym_min_max``."""
    from torch._dynamo.exc import UserError, UserErrorType

    from optimum_disc.compiler.capture import capture

    export, seen = torch.export.export, []

    def refuse_once(*args, **kwargs):
        seen.append(torch.sym_min)
        if len(seen) == 1:
            raise UserError(UserErrorType.CONSTRAINT_VIOLATION, "Constraints violated (seq)!")
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", refuse_once)
    sym_min = torch.sym_min
    graph = capture(_model("deberta-v2", "seq-cls", "cpu"))
    assert len(seen) == 2 and seen[0] is sym_min and seen[1] is not sym_min
    assert torch.sym_min is sym_min
    assert _symbolic_inputs(graph)
