"""``optimum-cli export disc`` and ``optimum-disc export`` on tiny local checkpoints."""

from __future__ import annotations

import sys

import pytest
import torch

from optimum.commands import optimum_cli
from optimum_disc import cli
from optimum_disc.modeling import (
    DiscModelForSequenceClassification,
    DiscModelForTokenClassification,
)

from .hf_helpers import DEVICE, assert_close, padded_batch


def test_optimum_cli_export_disc(tiny, tmp_path, monkeypatch, capsys):
    ckpt = tiny.checkpoint("text-classification")
    out = tmp_path / "exported"
    argv = ["optimum-cli", "export", "disc", "--model", str(ckpt.path), str(out)]
    argv += ["--task", "text-classification", "--precision", "fp32", "--device", DEVICE]
    monkeypatch.setattr(sys, "argv", argv)
    optimum_cli.main()
    assert "saved DiscModelForSequenceClassification (fp32)" in capsys.readouterr().out
    model = DiscModelForSequenceClassification.from_pretrained(out, device=DEVICE)
    assert model.tokenizer is not None, "the checkpoint's tokenizer is saved with the artifact"
    batch = padded_batch(model.tokenizer, ["a great film", "the plot was boring , i hated it"])
    assert_close(model(**batch).logits, ckpt.eager(**batch).logits.detach(), f"{ckpt}")


def test_optimum_cli_export_disc_error_exits_nonzero(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no-such-checkpoint"
    monkeypatch.setattr(
        sys, "argv", ["optimum-cli", "export", "disc", "--model", str(missing), str(tmp_path / "o")]
    )
    with pytest.raises(SystemExit) as exit_info:
        optimum_cli.main()
    assert exit_info.value.code == 1
    assert "optimum-disc export: error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_optimum_disc_export_infers_the_task(tiny, tmp_path, capsys):
    ckpt = tiny.checkpoint("token-classification")
    out = tmp_path / "exported"
    code = cli.main(["export", "--model", str(ckpt.path), str(out), "--device", DEVICE])
    assert code == 0
    printed = capsys.readouterr().out
    assert "task: token-classification" in printed
    model = DiscModelForTokenClassification.from_pretrained(out, device=DEVICE)
    assert model.artifact_manifest["task"] == "token-classification"
    batch = padded_batch(model.tokenizer, ["alice lives in london"])
    with torch.no_grad():
        ref = ckpt.eager(**batch).logits
    assert_close(model(**batch).logits, ref, f"{ckpt}")


def test_optimum_disc_export_rejects_a_bad_precision(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--model", "x", str(tmp_path / "o"), "--precision", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
