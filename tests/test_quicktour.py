"""The quicktour (examples/quicktour.py) end to end on a tiny random BERT, and its helpers.

The tour's default model takes minutes on Triton's CPU interpreter; a tiny checkpoint with a
small WordPiece vocabulary goes through every section in well under a minute.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

QUICKTOUR = Path(__file__).resolve().parents[1] / "examples" / "quicktour.py"
# fmt: off
WORDS = [
    "we", "are", "very", "happy", "to", "show", "you", "the", "story", "hope", "don", "'", "t",
    "hate", "it", ".", ",", "a", "an", "good", "bad", "great", "movie", "film", "is", "was", "not",
    "boring", "fun", "and", "but", "of", "this", "that", "too", "long", "funny", "dull", "plot",
]
# fmt: on
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


@pytest.fixture(scope="module")
def quicktour():
    spec = importlib.util.spec_from_file_location("quicktour", QUICKTOUR)
    module = importlib.util.module_from_spec(spec)
    sys.modules["quicktour"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("quicktour", None)


def _checkpoint(folder: Path, id2label: dict, sentences: list[str]) -> Path:
    """A tiny BertForSequenceClassification whose two tutorial predictions are clear-cut.

    Seeds are tried in order until both sentences have a logit margin of at least 0.3, so that
    bf16 rounding (about 1e-2 here) cannot flip a label: the test is deterministic.
    """
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        initializer_range=0.2,
        id2label=dict(id2label),
        label2id={v: k for k, v in id2label.items()},
    )
    config.save_pretrained(str(folder))  # tells AutoTokenizer the model type
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), model_max_length=64)
    inputs = tokenizer(sentences, padding=True, return_tensors="pt")
    for seed in range(100):
        torch.manual_seed(seed)
        model = transformers.BertForSequenceClassification(config).eval()
        with torch.no_grad():
            top2 = model(**inputs).logits.topk(2, dim=-1).values
        if bool(((top2[:, 0] - top2[:, 1]) >= 0.3).all()):
            break
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_quicktour_end_to_end_on_a_tiny_model(quicktour, tmp_path, device, capsys):
    checkpoint = _checkpoint(
        tmp_path / "checkpoint", {0: "NEGATIVE", 1: "POSITIVE"}, quicktour.SENTENCES
    )
    output = tmp_path / "out"
    argv = ["--model", str(checkpoint), "--output", str(output), "--device", device]
    argv += ["--slice", "4", "--batch-size", "4", "--iters", "1", "--warmup", "0", "--no-progress"]
    summary = quicktour.main(argv)
    printed = capsys.readouterr().out

    assert summary["ok"], printed
    # Mixed precision off: the same labels and (nearly) the same logits as the original.
    assert summary["fp32"]["labels"] == summary["original"]["labels"]
    assert summary["fp32"]["max_abs_logit_diff"] < 1e-4
    mixed = summary["mixed_precision"]
    assert mixed == ("fp16" if device == "cuda" else "bf16")
    assert summary[mixed]["labels"] == summary["original"]["labels"]
    assert summary[mixed]["max_abs_logit_diff"] < 0.1
    # The benchmark timed the three models.
    assert len(summary["benchmark"]["latency_ms"]) == 3
    assert all(ms > 0 for ms in summary["benchmark"]["latency_ms"].values())
    # Saved, then reloaded without export: the same predictions.
    saved = summary["saved"]
    for name in ("disc_manifest.json", "disc_program.json", "disc_weights.safetensors"):
        assert name in saved["files"]
        assert (Path(saved["folder"]) / name).is_file()
    assert "tokenizer_config.json" in saved["files"]
    assert saved["labels_equal"] and saved["max_abs_logit_diff"] <= 1e-3
    # The program and the debug dump.
    assert summary["program"]["lines"] > 5
    assert (output / "program.txt").read_text().startswith("def program(")
    debug = summary["debug"]["files"]
    assert "00_captured.py" in debug
    assert any(name.endswith("program.txt") for name in debug)
    assert any(name.startswith("kernels/") for name in debug)
    # The evaluation against the original on 4 movie-review sentences.
    evaluation = summary["evaluation"]
    assert evaluation["kind"] == "binary"
    assert evaluation["n_evaluated"] == 4
    assert 0.0 <= evaluation["accuracy"] <= 1.0 and evaluation["agreement"] is not None
    assert (output / "evaluation" / "results.json").is_file()
    # Everything printed is in summary.json, and the sections were announced.
    assert json.loads((output / "summary.json").read_text())["ok"] is True
    for title in ("Set-up", "original model", "mixed precision OFF", "Benchmark", "Evaluation"):
        assert title in printed


def test_star_rated_model_is_evaluated_by_polarity(quicktour, tmp_path, device):
    from optimum_disc import DiscModelForSequenceClassification

    stars = {i: f"{i + 1} star" + ("s" if i else "") for i in range(5)}
    checkpoint = _checkpoint(tmp_path / "stars", stars, quicktour.SENTENCES)
    original = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint)
    original = original.eval().to(device)
    model = DiscModelForSequenceClassification.from_pretrained(
        checkpoint, export=True, device=device
    )
    result = quicktour.evaluate_section(
        model,
        model.tokenizer,
        original,
        stars,
        slice_=4,
        batch_size=4,
        warmup=0,
        output=tmp_path / "out",
        progress=False,
    )
    assert result["kind"] == "stars"
    assert result["n_evaluated"] == 4
    assert result["agreement"] == 1.0  # fp32 against fp32
    assert result["accuracy"] == result["reference_accuracy"]


def test_label_plan(quicktour):
    assert quicktour.label_plan({0: "negative", 1: "positive"}) == (None, "binary")
    assert quicktour.label_plan({0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"})[1] == "binary"
    stars = {0: "1 star", 1: "2 stars", 2: "3 stars", 3: "4 stars", 4: "5 stars"}
    assert quicktour.label_plan(stars) == ({"NEGATIVE": "1 star", "POSITIVE": "5 stars"}, "stars")
    assert quicktour.label_plan({0: "LABEL_0", 1: "LABEL_1"}) == (None, "other")


def test_star_polarity_accuracy(quicktour):
    stars = {0: "1 star", 1: "2 stars", 2: "3 stars", 3: "4 stars", 4: "5 stars"}
    labels = [0, 0, 4, 4, 4, -1]
    predictions = [1, 2, 3, 4, 0, 4]  # hit, middle (miss), hit, hit, miss, not evaluated
    assert quicktour.star_polarity_accuracy(labels, predictions, stars) == pytest.approx(3 / 5)


def test_fp16_falls_back_to_bf16_when_a_weight_overflows(quicktour):
    model = quicktour.tiny_bert()
    assert quicktour.choose_mixed_precision(None, "cuda", model)[0] == "fp16"
    assert quicktour.choose_mixed_precision(None, "cpu", model)[0] == "bf16"
    with torch.no_grad():
        model.bert.pooler.dense.weight[0, 0] = 1e5
    precision, why = quicktour.choose_mixed_precision("fp16", "cuda", model)
    assert precision == "bf16"
    assert "bert.pooler.dense.weight" in why and "65504" in why


@pytest.mark.parametrize("option", ["--slice=-1", "--iters=0", "--batch-size=0"])
def test_bad_options_are_refused(quicktour, option):
    with pytest.raises(SystemExit):
        quicktour.parse_args([option])
