"""End to end: tiny random BERT models compiled and compared with eager PyTorch, element by
element, over fresh random inputs, shapes and masks, with one compile per model."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from optimum_disc import DiscSettings, optimize
from optimum_disc.compiler import CompiledModel, Program

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=2,
    num_labels=3,
)
HEADS = {
    "seq-cls": transformers.BertForSequenceClassification,
    "base": transformers.BertModel,
}
# fp32 compiled against eager fp32: max |difference| relative to the output's scale.
FP32_RTOL = 1e-4


def _model(kind: str, device, **config):
    model = HEADS[kind](transformers.BertConfig(**{**TINY, **config})).eval().to(device)
    return model


def _inputs(batch, seq, device, padding="random", vocab=99):
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    types = torch.randint(0, 2, (batch, seq), device=device)
    lengths = torch.randint(1, seq + 1, (batch,), device=device)
    lengths[0] = seq
    pos = torch.arange(seq, device=device)[None]
    if padding == "right":
        mask = pos < lengths[:, None]
    elif padding == "left":
        mask = pos >= (seq - lengths)[:, None]
    elif padding == "random":
        mask = torch.rand(batch, seq, device=device) > 0.3
        mask[:, 0] = True
    else:
        mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    return {"input_ids": ids, "attention_mask": mask.long(), "token_type_ids": types}


def _compare(out, ref, mask, remove_padding, rtol, seed):
    for field in out:
        got, want = out[field], ref[field].float()
        assert got.dtype == torch.float32, field
        assert got.shape == want.shape, field
        if field == "last_hidden_state" and remove_padding:
            pad = mask == 0
            assert torch.all(got[pad] == 0), f"{field}: padding positions must be zeros"
            got, want = got[~pad], want[~pad]
        scale = want.abs().max().clamp(min=1.0)
        err = (got - want).abs().max() / scale
        assert err <= rtol, f"{field}: max |diff| / scale = {err:.3g} > {rtol} (seed {seed})"


@pytest.fixture(
    scope="module",
    params=[(k, rp) for k in HEADS for rp in (True, False)],
    ids=lambda p: f"{p[0]}-{'unpadded' if p[1] else 'padded'}",
)
def fp32_compiled(request):
    kind, remove = request.param
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _model(kind, device)
    return model, optimize(model, DiscSettings(precision="fp32", remove_padding=remove)), remove


@pytest.mark.parametrize("padding", ["right", "left", "random", "none"])
def test_fp32_matches_eager_for_every_mask(fp32_compiled, padding, device, seed):
    model, compiled, remove = fp32_compiled
    for batch, seq in ((3, 7), (1, 1), (2, 17)):
        inputs = _inputs(batch, seq, device, padding)
        with torch.no_grad():
            ref = model(**inputs)
        out = compiled(**inputs)
        _compare(out, ref, inputs["attention_mask"], remove, FP32_RTOL, seed)


def test_intermediates_are_freed_after_their_last_read(device):
    """Each buffer that is no output is freed right after the last call that reads it, never
    before: so a call's (and a CUDA graph's) memory is a few buffers, not every layer's."""
    model = _model("seq-cls", device, num_hidden_layers=6)
    compiled = optimize(model, DiscSettings(precision="fp32"))
    program = compiled.program
    outputs = set(program.outputs.values())
    alive, freed, most = set(), set(), 0
    for call, dead in zip(program.calls, compiled._dead_after, strict=True):
        reads = {r for r in call.inputs.values() if r is not None and ":" not in r}
        assert reads <= alive, f"{call.output} reads {sorted(reads - alive)}, already freed"
        alive.add(call.output)
        most = max(most, len(alive))
        assert not set(dead) & outputs, f"an output freed after {call.output}"
        alive -= set(dead)
        freed |= set(dead)
    assert alive == outputs and freed == set(program.buffers) - outputs
    # The residual stream, the buffer being written and one between them (3 here); without
    # freeing, the six layers' 46 buffers would all be alive at the end.
    assert most <= 4, f"{most} buffers alive at once"


def test_one_compile_serves_every_shape(device, seed, monkeypatch):
    model = _model("seq-cls", device)
    exports = []
    real_export = torch.export.export
    monkeypatch.setattr(
        torch.export, "export", lambda *a, **k: exports.append(1) or real_export(*a, **k)
    )
    compiled = optimize(model, precision="fp32")
    assert len(exports) == 1
    for batch, seq in ((1, 64), (5, 3), (33, 2), (2, 29)):
        inputs = _inputs(batch, seq, device)
        with torch.no_grad():
            ref = model(**inputs)
        _compare(compiled(**inputs), ref, inputs["attention_mask"], True, FP32_RTOL, seed)
    assert len(exports) == 1


@pytest.mark.parametrize("remove_padding", [True, False])
def test_untuned_gemms_are_the_ones_the_run_asks_for(remove_padding, device, seed, monkeypatch):
    """`_untuned_gemms`, which the warm-up of a new shape bucket compiles and tunes ahead, lists
    exactly the GEMMs (shapes, dtype, epilogue, row bucket) that the bucket's run then asks for,
    and none whose config is already known."""
    from optimum_disc.compiler import runtime

    monkeypatch.setattr(runtime, "_TUNED", {})
    model = _model("seq-cls", device)
    compiled = optimize(model, DiscSettings(precision="fp16", remove_padding=remove_padding))
    compiled.program.tuning.clear()
    inputs = _inputs(3, 21, device)
    asked = []
    real = CompiledModel.gemm_config

    def gemm_config(self, *gemm):
        asked.append(gemm)
        return real(self, *gemm)

    monkeypatch.setattr(CompiledModel, "gemm_config", gemm_config)
    compiled(**inputs)
    # On a GPU the call tuned them: forget that, as before a bucket's first call.
    compiled.program.tuning.clear()
    runtime._TUNED.clear()
    b_pad, s_pad = (3, 21) if device == "cpu" else (runtime._bucket(3, 1), runtime._bucket(21, 16))
    real_tokens = int(inputs["attention_mask"].sum())
    rows = real_tokens if remove_padding else b_pad * s_pad
    if remove_padding and device != "cpu":
        rows = runtime._row_bucket(real_tokens)
    static = {"shape": (b_pad, s_pad, rows)}
    # The classifier (2 labels) is not tuned: too few columns (`matmul.worth_tuning`).
    tuned = [g for g in asked if g[1] >= 32]
    assert len(tuned) < len(asked)
    want = {compiled._gemm_key(*g): g for g in tuned}
    got = compiled._untuned_gemms(static)
    # One per shape, epilogue and row bucket (the last layer's GEMMs after its attention run on
    # one row per sequence: the same shapes and epilogues at another bucket).
    m_bucket = compiled._kernels.matmul.m_bucket
    assert len(got) == len(want) == len({(m_bucket(g[0]), *g[1:3], *g[4:]) for g in tuned})
    assert {compiled._gemm_key(*g): g for g in got} == want
    # Known configs are left out.
    for g in got:
        compiled.program.tuning[compiled._gemm_key(*g)] = {"block_m": 16}
    assert compiled._untuned_gemms(static) == []


@pytest.mark.gpu
def test_first_call_of_a_bucket_compiles_and_tunes_before_it_runs(device, seed, monkeypatch):
    """A new shape bucket's first call compiles its kernels and tunes its GEMMs in the warm-up
    (one thread pool for every kernel, then the timing): its first run compiles nothing on the
    spot and tunes nothing, and the result is right."""
    from triton.runtime import _async_compile
    from triton.runtime.jit import JITFunction

    from optimum_disc.compiler import runtime
    from optimum_disc.kernels import launch, matmul

    if not hasattr(JITFunction, "_do_compile") or matmul.AsyncCompileMode is None:
        pytest.skip("this Triton has no asynchronous compilation")
    monkeypatch.setenv("OPTIMUM_DISC_COMPILE_THREADS", "8")
    monkeypatch.setattr(runtime, "_TUNED", {})
    # Sizes no other test uses, so that the kernels are new to this process as well.
    model = _model("seq-cls", device, hidden_size=80, num_attention_heads=5, intermediate_size=176)
    compiled = optimize(model, DiscSettings(precision="fp16"))
    events = []
    real_execute, real_tune, real_compile = (
        CompiledModel._execute,
        matmul.tune,
        JITFunction._do_compile,
    )

    def execute(self, static):
        events.append(("compile pass" if launch.compiling_only() else "run", None))
        return real_execute(self, static)

    def tune(*a, **k):
        # (m, n, k) and the epilogue: the last layer's attention output projection and the
        # pooler have the same shape at the batch's rows, with another epilogue.
        events.append(("tune", (*a[:3], *a[5:], *sorted(k.items()))))
        return real_tune(*a, **k)

    def do_compile(self, *a, **k):
        pooled = _async_compile.active_mode.get() is not None
        events.append(("compile", "pooled" if pooled else getattr(self, "__name__", "?")))
        return real_compile(self, *a, **k)

    monkeypatch.setattr(CompiledModel, "_execute", execute)
    monkeypatch.setattr(matmul, "tune", tune)
    monkeypatch.setattr(JITFunction, "_do_compile", do_compile)
    inputs = _inputs(3, 21, device)
    with torch.no_grad():
        ref = model.half()(**inputs)
    out = compiled(**inputs)
    kinds = [e[0] for e in events]
    assert "compile pass" in kinds and "run" in kinds, events
    first_run = kinds.index("run")
    assert kinds.index("compile pass") < first_run
    tunes = [e for e in events[:first_run] if e[0] == "tune"]
    assert len(tunes) == len({e[1] for e in tunes}) >= 4, events
    late = [
        e for e in events[first_run:] if e[0] == "tune" or (e[0] == "compile" and e[1] != "pooled")
    ]
    assert not late, f"the first run compiled or tuned on the spot: {late}"
    _compare(out, ref, inputs["attention_mask"], True, 2e-2, seed)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_within_twice_eager_half_error(precision, device, seed):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = _model("base", device)
    half = _model("base", device).to(dtype)
    half.load_state_dict(model.state_dict())
    compiled = optimize(model, precision=precision, remove_padding=False)
    inputs = _inputs(4, 13, device, "right")
    with torch.no_grad():
        ref, ref_half = model(**inputs), half(**inputs)
    out = compiled(**inputs)
    for field in ("last_hidden_state", "pooler_output"):
        valid = inputs["attention_mask"].bool() if field == "last_hidden_state" else slice(None)
        want = ref[field][valid]
        ours = (out[field][valid] - want).abs().max()
        eager = (ref_half[field][valid].float() - want).abs().max()
        assert out[field].dtype == torch.float32
        # A floor of one half-precision ulp at the output's scale keeps a lucky eager run from
        # setting a bound no rounding could meet.
        floor = torch.finfo(dtype).eps * want.abs().max()
        assert ours <= 2 * eager + floor, (
            f"{precision} {field}: ours {ours:.3g} vs eager half {eager:.3g} (seed {seed})"
        )


def test_bad_inputs_get_clear_errors_and_the_next_call_works(device, seed):
    model = _model("seq-cls", device)
    compiled = optimize(model, precision="fp32")
    good = _inputs(2, 5, device)
    cases = [
        ({**good, "input_ids": good["input_ids"] + 99}, "outside the vocabulary"),
        ({**good, "input_ids": good["input_ids"] - 100}, "outside the vocabulary"),
        ({**good, "token_type_ids": good["token_type_ids"] + 2}, "token_type_ids holds"),
        (_inputs(1, 65, device), "exceeds max_position_embeddings=64"),
        ({**good, "attention_mask": good["attention_mask"][:, :4]}, "must match"),
        ({**good, "input_ids": good["input_ids"].float()}, "integer tensors"),
        ({**good, "attention_mask": good["attention_mask"] * 2}, "only 0 and 1"),
        ({k: v[:0] for k, v in good.items()}, "the batch is empty"),
        ({**good, "position_ids": good["input_ids"]}, "position_ids is not supported"),
    ]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=message):
            compiled(**inputs)
    with torch.no_grad():
        ref = model(**good)
    _compare(compiled(**good), ref, good["attention_mask"], True, FP32_RTOL, seed)


def test_a_cpu_model_where_kernels_are_compiled_for_the_gpu_says_so(monkeypatch):
    """On a machine with a GPU the kernels are compiled, not interpreted, and a CPU tensor can
    reach no kernel: a call on the CPU says what to do instead of failing inside Triton. The
    model compiles and moves to the GPU as before."""
    from optimum_disc.compiler import runtime

    compiled = optimize(_model("seq-cls", "cpu"), precision="fp32")
    monkeypatch.setattr(runtime, "_kernels_on_cpu", lambda: False)
    with pytest.raises(RuntimeError, match=r"move it there \(\.to\('cuda'\)\)"):
        compiled(**_inputs(2, 5, "cpu"))
    monkeypatch.undo()
    if runtime._kernels_on_cpu():  # a machine without a GPU: the call runs
        assert compiled(**_inputs(2, 5, "cpu")).logits.shape[0] == 2


def test_return_dict_false_gives_the_tuple(device):
    model = _model("base", device)
    compiled = optimize(model)
    inputs = _inputs(2, 4, device, "none")
    out = compiled(**inputs, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2
    assert isinstance(compiled(**inputs), transformers.modeling_outputs.ModelOutput)


def test_training_mode_is_refused(device):
    model = _model("seq-cls", device).train()
    with pytest.raises(ValueError, match="training mode"):
        optimize(model)


def test_code_has_one_line_per_kernel_call_and_coverage_counts_flops(device):
    compiled = optimize(_model("seq-cls", device), precision="fp16")
    lines = compiled.code.splitlines()
    calls = compiled.program.calls
    body = [ln for ln in lines[1:] if not ln.strip().startswith(("#", "return"))]
    assert len(body) == len(calls)
    assert sum("= attention(" in ln for ln in body) == TINY["num_hidden_layers"]
    # Q, K and V are one GEMM per layer: 4 GEMMs a layer, then the pooler and the classifier.
    assert sum("= linear(" in ln for ln in body) == 4 * TINY["num_hidden_layers"] + 2
    assert "f16[R, 96]" in compiled.code  # the packed QKV projection, in half precision
    report = compiled.coverage
    assert report["flops_share_in_our_kernels"] == 1.0
    assert report["fallback_ops"] == {}
    assert report["kernel_calls"]["embed_layernorm"] == 1


def test_debug_dir_dumps_every_stage(device, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMUM_DISC_DEBUG_DIR", str(tmp_path))
    compiled = optimize(_model("seq-cls", device, hidden_act="gelu_new"))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "00_captured.py"
    assert any(n.endswith("after_fuse_attention.py") for n in names)
    assert "10_program.txt" in names and "12_coverage.json" in names
    assert (tmp_path / "10_program.txt").read_text() == compiled.code
    kernels = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    assert {"linear.py", "attention.py", "layer_norm.py", "embed_layernorm.py"} <= set(kernels)
    json.loads((tmp_path / "12_coverage.json").read_text())


def test_program_round_trips_through_json(device, seed):
    model = _model("seq-cls", device)
    compiled = optimize(model, precision="bf16")
    text = compiled.program.to_json()
    weights = {k: v.clone() for k, v in compiled.program.weights.items()}
    again = CompiledModel(Program.from_json(text, weights), compiled.settings, device=device)
    inputs = _inputs(3, 9, device)
    torch.testing.assert_close(again(**inputs).logits, compiled(**inputs).logits, atol=0, rtol=0)
    assert again.code == compiled.code


def test_program_refuses_mismatched_weights(device):
    compiled = optimize(_model("seq-cls", device))
    weights = dict(compiled.program.weights)
    name = next(iter(weights))
    weights[name] = weights[name][:-1]
    with pytest.raises(ValueError, match=f"weight {name!r}"):
        Program.from_json(compiled.program.to_json(), weights)
