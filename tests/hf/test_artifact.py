"""The saved artifact: its files, verification on load, atomic saves."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle

import pytest
import torch

import optimum_disc
import optimum_disc.compiler
from optimum_disc import artifact
from optimum_disc.modeling import DiscModelForMaskedLM, DiscModelForSequenceClassification

from .hf_helpers import DEVICE, assert_close, padded_batch

TASK = "text-classification"


def _digests(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_folder_holds_the_artifact_and_its_manifest(tiny):
    folder = tiny.saved_artifact(TASK)
    names = set(_digests(folder))
    assert {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "disc_program.json",
        "disc_weights.safetensors",
        "disc_settings.json",
        "disc_manifest.json",
    } <= names
    manifest = json.loads((folder / "disc_manifest.json").read_text())
    assert manifest["format"] == "optimum-disc" and manifest["format_version"] == 1
    assert manifest["task"] == TASK
    assert manifest["model_class"] == "DiscModelForSequenceClassification"
    assert set(manifest["versions"]) == {"optimum_disc", "torch", "triton", "transformers"}
    assert manifest["versions"]["optimum_disc"] == optimum_disc.__version__
    assert manifest["versions"]["torch"] == torch.__version__
    expected_cc = "{}.{}".format(*torch.cuda.get_device_capability()) if DEVICE == "cuda" else "cpu"
    assert manifest["device"]["compute_capability"] == expected_cc
    # every other file is listed with its size and sha256
    assert set(manifest["files"]) == names - {"disc_manifest.json"}
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert (
        json.loads((folder / "disc_settings.json").read_text())
        == tiny.model(TASK).settings.to_dict()
    )


def test_load_needs_no_checkpoint_no_compiler_no_pickle(tiny, artifact_copy, monkeypatch):
    ckpt = tiny.checkpoint(TASK)
    folder = artifact_copy(TASK)

    def forbidden(*args, **kwargs):
        raise AssertionError("loading an artifact must not do this")

    monkeypatch.setattr(optimum_disc.compiler, "optimize", forbidden)
    monkeypatch.setattr(
        DiscModelForSequenceClassification.auto_model_class, "from_pretrained", forbidden
    )
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    moved = ckpt.path.with_name(ckpt.path.name + "-away")
    ckpt.path.rename(moved)
    try:
        model = DiscModelForSequenceClassification.from_pretrained(folder, device=DEVICE)
    finally:
        moved.rename(ckpt.path)
    assert model.artifact_manifest["task"] == TASK
    assert model.coverage == tiny.model(TASK).coverage
    batch = padded_batch(ckpt.tokenizer, ["a fun story", "the actor was terrible , i hated it"])
    assert_close(model(**batch).logits, ckpt.eager(**batch).logits.detach(), f"{ckpt}")


@pytest.mark.parametrize(
    "name", ["disc_weights.safetensors", "disc_program.json", "config.json", "tokenizer.json"]
)
def test_tampered_file_is_refused(artifact_copy, name):
    folder = artifact_copy(TASK)
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"'{name}'.*sha256.*export the model again"):
        DiscModelForSequenceClassification.from_pretrained(folder, device=DEVICE)


def test_truncated_file_is_refused(artifact_copy):
    folder = artifact_copy(TASK)
    path = folder / "disc_weights.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="'disc_weights.safetensors'.*bytes.*export the model"):
        DiscModelForSequenceClassification.from_pretrained(folder, device=DEVICE)


def test_missing_file_is_refused(artifact_copy):
    folder = artifact_copy(TASK)
    (folder / "disc_program.json").unlink()
    with pytest.raises(ValueError, match="'disc_program.json'.*is missing"):
        DiscModelForSequenceClassification.from_pretrained(folder, device=DEVICE)


def test_other_format_version_is_refused(artifact_copy):
    folder = artifact_copy(TASK)
    manifest = json.loads((folder / "disc_manifest.json").read_text())
    manifest["format_version"] = 99
    manifest["versions"]["optimum_disc"] = "9.0.0"
    (folder / "disc_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format_version 99, written by optimum-disc 9.0.0.*again"):
        DiscModelForSequenceClassification.from_pretrained(folder, device=DEVICE)


def test_manifest_cannot_point_outside_the_folder(artifact_copy):
    folder = artifact_copy(TASK)
    manifest = json.loads((folder / "disc_manifest.json").read_text())
    manifest["files"]["../outside.json"] = {"sha256": "0" * 64, "size": 1}
    (folder / "disc_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="'../outside.json', outside the folder"):
        DiscModelForSequenceClassification.from_pretrained(folder, device=DEVICE)


def test_other_gpu_architecture_loads_and_logs(tiny, artifact_copy, caplog):
    ckpt = tiny.checkpoint(TASK)
    folder = artifact_copy(TASK)
    manifest = json.loads((folder / "disc_manifest.json").read_text())
    # a GPU architecture no machine running the tests has
    manifest["device"] = {"type": "cuda", "name": "Imaginary GPU", "compute_capability": "1.5"}
    (folder / "disc_manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.INFO, logger="optimum_disc"):
        model = DiscModelForSequenceClassification.from_pretrained(folder, device=DEVICE)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "Imaginary GPU (compute capability 1.5)" in said
    batch = padded_batch(ckpt.tokenizer, ["i loved it"])
    assert_close(model(**batch).logits, ckpt.eager(**batch).logits.detach(), f"{ckpt}")


def test_failed_save_leaves_the_previous_folder(tiny, artifact_copy, monkeypatch):
    """A write that fails half-way (the weights) leaves the earlier save untouched."""
    folder = artifact_copy(TASK)
    before = _digests(folder)
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def fails_half_way(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fails_half_way)
    model = tiny.model(TASK)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(folder)
    assert _digests(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name], "temporary left"
    # a save into a new folder that fails creates nothing
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(folder.parent / "new")
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
    # and once it works, the folder is replaced as a whole and loads
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    (folder / "stale.txt").write_text("from an earlier save")
    model.save_pretrained(folder)
    assert not (folder / "stale.txt").exists()
    assert artifact.artifact_files(folder) == sorted(_digests(folder))


def test_save_refuses_a_folder_of_other_files(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an optimum-disc artifact \\(notes.txt\\)"):
        tiny.model(TASK).save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_masked_lm_with_tied_weights_round_trips(tiny, tmp_path):
    ckpt = tiny.checkpoint("fill-mask")
    tiny.model("fill-mask").save_pretrained(tmp_path / "mlm")
    model = DiscModelForMaskedLM.from_pretrained(tmp_path / "mlm", device=DEVICE)
    batch = padded_batch(ckpt.tokenizer, ["alice eats [MASK] today"])
    assert_close(model(**batch).logits, ckpt.eager(**batch).logits.detach(), f"{ckpt}")
