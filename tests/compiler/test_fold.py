"""LayerNorms folded into the GEMMs that read them (`CompiledModel._layer_norm_folds`): which
fold, when they fold, that the buffers they need stay alive, and the outputs against eager
PyTorch over fresh random inputs."""

from __future__ import annotations

import pytest
import torch
import transformers

from optimum_disc import DiscSettings, optimize
from optimum_disc.compiler import runtime

from .test_optimize import _compare, _inputs, _model


def _count_layer_norms(monkeypatch) -> list[int]:
    launched = []
    real = runtime._LAUNCH["layer_norm"]

    def counted(*args):
        launched.append(1)
        return real(*args)

    monkeypatch.setitem(runtime._LAUNCH, "layer_norm", counted)
    return launched


def test_which_layer_norms_fold(device):
    """In a two-layer BERT classifier: the first layer's attention LayerNorm (read by FFN up
    and as FFN down's residual), and the last layer's two (its rows are the first tokens only;
    the second is read by the pooler alone). The first layer's output LayerNorm is also read by
    the first-token gather of the last layer, which is no GEMM: it runs as a kernel."""
    compiled = optimize(_model("seq-cls", device), precision="fp16")
    calls = compiled.program.calls
    folds = compiled._layer_norm_folds
    assert len(folds) == 3
    assert sum(c.kernel == "layer_norm" for c in calls) == 4
    for i, fold in folds.items():
        assert calls[i].kernel == "layer_norm" and fold["h"] == calls[i].output
        for j in fold["x"]:
            assert calls[j].kernel == "linear" and calls[j].inputs["x"] == fold["h"]
        for j in fold["residual"]:
            assert calls[j].inputs["residual"] == fold["h"] and j > fold["x"][0]
    assert [len(f["residual"]) for f in folds.values()] == [1, 1, 0]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_folded_model_matches_eager(precision, device, seed, monkeypatch):
    """A 16-bit call of few rows launches one LayerNorm kernel of four, and its outputs stay
    within the 16-bit tolerance of eager fp32; with folding off, four."""
    model = _model("seq-cls", device)
    compiled = optimize(model, DiscSettings(precision=precision))
    launched = _count_layer_norms(monkeypatch)
    for batch, seq, padding in ((3, 7, "random"), (2, 17, "right"), (1, 1, "none")):
        inputs = _inputs(batch, seq, device, padding)
        with torch.no_grad():
            ref = model(**inputs)
        launched.clear()
        out = compiled(**inputs)
        assert len(launched) == 1, f"{batch}x{seq}: {len(launched)} LayerNorm launches"
        _compare(out, ref, inputs["attention_mask"], True, 2e-2, seed)
    monkeypatch.setattr(runtime, "FOLD_LAYER_NORMS_MAX_ROWS", 0)
    launched.clear()
    unfolded = optimize(model, DiscSettings(precision=precision))
    inputs = _inputs(3, 7, device)
    unfolded(**inputs)
    assert len(launched) == 4


def test_no_fold_in_fp32_or_past_the_row_limit(device, monkeypatch):
    model = _model("seq-cls", device)
    launched = _count_layer_norms(monkeypatch)
    optimize(model, precision="fp32")(**_inputs(3, 7, device))
    assert len(launched) == 4
    compiled = optimize(model, precision="fp16")
    monkeypatch.setattr(runtime, "FOLD_LAYER_NORMS_MAX_ROWS", 16)
    launched.clear()
    # 36 token rows (bucket 64) do not fold; the last layer's two, on 4 batch rows, do.
    compiled(**_inputs(4, 9, device, "none"))
    assert len(launched) == 2


def test_folded_buffers_live_until_their_last_reader(device):
    """With every foldable LayerNorm folded, each call finds what it reads alive: the rows
    before a folded LayerNorm until its last residual reader, its statistics from its first
    reader on; a folded LayerNorm's output is never made."""
    compiled = optimize(_model("seq-cls", device, num_hidden_layers=4), precision="fp16")
    folds = frozenset(compiled._layer_norm_folds)
    program = compiled.program
    outputs = set(program.outputs.values())
    alive = set()
    made = set()
    reads_of = compiled._inputs_of(folds)
    for i, (call, dead) in enumerate(zip(program.calls, compiled._dead_after(folds), strict=True)):
        refs = reads_of[i]
        if refs is None:
            assert i in folds and not dead
            continue
        reads = {r for k, r in refs.items() if r and ":" not in r and k != "ln_stats"}
        assert reads <= alive, f"{call.output} reads {sorted(reads - alive)}, not alive"
        stats = refs.get("ln_stats")
        if stats is not None:
            if stats not in made:  # its first x reader writes it
                made.add(stats)
                alive.add(stats)
            assert stats in alive
        alive.add(call.output)
        alive -= set(dead)
    assert alive == outputs
    for i in folds:
        h = compiled._layer_norm_folds[i]["h"]
        assert all(h not in (r or {}).values() for r in reads_of), h


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_folded_bert_layers_gpu(precision, device, seed, monkeypatch):
    """BERT-base's widths (two layers) on the GPU, with CUDA graphs and padding removed, at
    row counts that fold (up to 256) and one that does not: within twice eager half
    precision's error of eager fp32, on the call that captures and on replays."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    config = transformers.BertConfig(num_hidden_layers=2, vocab_size=1000, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval().to(device)
    half = transformers.BertForSequenceClassification(config).eval().to(device, dtype)
    half.load_state_dict(model.state_dict())
    compiled = optimize(model, precision=precision)
    for batch, seq, padding in (
        (2, 16, "none"),
        (1, 128, "none"),
        (5, 40, "random"),
        (16, 128, "right"),
    ):
        for _ in range(3):  # the first call captures, the next ones replay
            inputs = _inputs(batch, seq, device, padding, vocab=1000)
            with torch.no_grad():
                ref = model(**inputs).logits
                ref_half = half(**inputs).logits.float()
            out = compiled(**inputs).logits
            ours, eager = (out - ref).abs().max(), (ref_half - ref).abs().max()
            floor = torch.finfo(dtype).eps * ref.abs().max()
            assert ours <= 2 * eager + floor, (
                f"{batch}x{seq}: ours {ours:.3g} vs eager half {eager:.3g} (seed {seed})"
            )
    assert compiled._folds_for({"shape": (2, 16, 32)})
    monkeypatch.setattr(runtime, "FOLD_LAYER_NORMS_MAX_ROWS", 0)
    assert compiled._folds_for({"shape": (2, 16, 32)}) == frozenset()
