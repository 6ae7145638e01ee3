"""Evaluation in two processes (accelerate on the CPU) gives what one process gives.

The compiled model is a tiny random BERT saved as an artifact folder; its kernels run on Triton's
CPU interpreter. The two-process runs start ``accelerate launch`` (through ``--num-processes 2``
and directly) in a folder outside the repository.
"""

from __future__ import annotations

import csv
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import transformers

from optimum_disc.evaluation import evaluate_model

WORDS = "good bad movie film great awful the a is was not very plot actor story boring fun dull"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LABELS = {0: "NEGATIVE", 1: "POSITIVE"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A compiled artifact folder (with its tokenizer) and the checkpoint it came from."""
    from optimum_disc.modeling import DiscModelForSequenceClassification

    root = tmp_path_factory.mktemp("parallel")
    (root / "vocab.txt").write_text("\n".join(SPECIAL + WORDS.split()) + "\n")
    tokenizer = transformers.BertTokenizerFast(
        vocab_file=str(root / "vocab.txt"), model_max_length=32
    )
    config = transformers.BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS.split()),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    torch.manual_seed(random.SystemRandom().randrange(2**31))
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(50)
    checkpoint = root / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    disc = DiscModelForSequenceClassification.from_pretrained(
        str(checkpoint), export=True, device="cpu"
    )
    disc.save_pretrained(root / "artifact")
    return root / "artifact", checkpoint


def write_data(path: Path, seed: int, n: int = 12) -> None:
    rng = random.Random(seed)
    words = WORDS.split()
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 10))) for _ in range(n)]
    labels = [rng.choice(["NEGATIVE", "POSITIVE"]) for _ in texts]
    texts[3], labels[7] = "", ""  # bad rows: counted before the batches are shared out
    datasets.Dataset.from_dict({"text": texts, "label": labels}).to_csv(path, index=False)


def cli(cwd: Path, *argv, launcher=("-m", "optimum_disc.cli")) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, *launcher, "evaluate", *map(str, argv)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predictions(folder: Path) -> list[dict]:
    with open(folder / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_processes_equal_one(artifact, tmp_path, seed):
    model, checkpoint = artifact
    write_data(tmp_path / "reviews.csv", seed)
    common = [
        "--model", model, "--reference", checkpoint, "--dataset", tmp_path / "reviews.csv",
        "--batch-size", 2, "--device", "cpu", "--warmup", 0, "--no-progress",
    ]  # fmt: skip
    one = cli(tmp_path, *common, "--output", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = cli(tmp_path, *common, "--output", tmp_path / "two", "--num-processes", 2)
    assert two.returncode == 0, two.stderr
    assert "2 processes" in two.stdout

    single = json.loads((tmp_path / "one" / "results.json").read_text())
    double = json.loads((tmp_path / "two" / "results.json").read_text())
    assert single["processes"] == [] and len(double["processes"]) == 2
    assert [p["rank"] for p in double["processes"]] == [0, 1]
    assert sum(p["rows"] for p in double["processes"]) == single["n_evaluated"] == 10
    assert all(p["batches"] > 0 for p in double["processes"])
    for key in ("n_rows", "n_evaluated", "bad_rows", "agreement", "max_abs_logit_diff",
                "mean_abs_logit_diff", "batch_sizes", "batch_lengths"):  # fmt: skip
        assert double[key] == single[key], key
    for run in ("model", "reference"):
        assert double[run]["accuracy"] == single[run]["accuracy"]
        assert double[run]["macro_f1"] == single[run]["macro_f1"]
    assert predictions(tmp_path / "two") == predictions(tmp_path / "one")

    # the same through accelerate launch started by hand
    launched = cli(
        tmp_path, *common, "--output", tmp_path / "launched",
        launcher=("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--main_process_port", str(free_port()), "-m", "optimum_disc.cli"),
    )  # fmt: skip
    if launched.returncode != 0:
        pytest.fail(launched.stderr[-3000:])
    assert predictions(tmp_path / "launched") == predictions(tmp_path / "one")


def test_several_processes_need_an_artifact(artifact, tmp_path, seed):
    _, checkpoint = artifact
    write_data(tmp_path / "reviews.csv", seed)
    done = cli(
        tmp_path, "--model", checkpoint, "--dataset", tmp_path / "reviews.csv",
        "--device", "cpu", "--num-processes", 2,
    )  # fmt: skip
    assert done.returncode == 1
    assert "is not a compiled artifact folder" in done.stderr


def test_one_process_in_process_is_the_plain_run(artifact, seed):
    """distributed=True without accelerate launch is a single process: the ordinary result."""
    from optimum_disc.modeling import DiscModelForSequenceClassification

    model = DiscModelForSequenceClassification.from_pretrained(str(artifact[0]), device="cpu")
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(WORDS.split(), k=rng.randint(1, 8))) for _ in range(5)]
    data = datasets.Dataset.from_dict({"text": texts, "label": [rng.randint(0, 1) for _ in texts]})
    kwargs = {"batch_size": 2, "progress": False, "warmup": 0}
    plain = evaluate_model(model, None, data, **kwargs)
    alone = evaluate_model(model, None, data, distributed=True, **kwargs)
    assert alone.model.predictions == plain.model.predictions
    assert alone.processes == []
