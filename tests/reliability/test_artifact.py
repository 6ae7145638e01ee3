"""The saved artifact under damage, hostile content, a killed save, and an upload.

Complements tests/hf/test_artifact.py and tests/hf/test_hub.py (byte flips, truncation, a
missing program, another format version, another GPU architecture, the HTTP-level upload),
which are not repeated here.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from optimum_disc import artifact
from optimum_disc.modeling import DiscModelForSequenceClassification

from .helpers import DEVICE, compare, digests, eager, random_inputs, rehash

TEXTS = ["w1 w2 w3", "w40 w41", ""]


def _load(folder: Path):
    return DiscModelForSequenceClassification.from_pretrained(folder, device=DEVICE)


def _assert_correct(model, classifier, seed: int):
    inputs = random_inputs(torch.Generator().manual_seed(seed), 3, 7, "right")
    compare(model(**inputs), eager(classifier.eager, inputs), inputs["attention_mask"], True)
    batch = classifier.tokenizer(TEXTS, padding=True, return_tensors="pt").to(DEVICE)
    compare(model(**batch), eager(classifier.eager, batch), batch["attention_mask"], True)


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1))


def _edit_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "disc_weights.safetensors"
    weights = load_file(str(path))
    change(weights)
    save_file(weights, str(path), metadata={"format": "pt"})


def _first(d: dict) -> str:
    return next(iter(d))


# -- edits caught by the manifest's sha256 ----------------------------------------------------


def _eps(program: dict) -> None:
    call = next(c for c in program["calls"] if "eps" in c["attrs"])
    call["attrs"]["eps"] = 0.5


def _nudge_weight(weights: dict) -> None:
    name = next(n for n in weights if "word_embeddings" in n)
    weights[name] = weights[name].clone()
    weights[name][5, 3] += 0.01


EDITS = {
    # valid JSON, valid safetensors: only the hashes tell
    "program-eps": lambda f: _edit_json(f / "disc_program.json", _eps),
    "weights-values": lambda f: _edit_weights(f, _nudge_weight),
    "settings-precision": lambda f: _edit_json(
        f / "disc_settings.json", lambda s: s.update(precision="fp16")
    ),
    "config-labels": lambda f: _edit_json(
        f / "config.json", lambda c: c.update(id2label={"0": "a", "1": "b", "2": "c"})
    ),
    "tokenizer-vocab": lambda f: _edit_json(
        f / "tokenizer.json", lambda t: t["model"]["vocab"].update({"w1": 7, "w3": 5})
    ),
    "weights-truncated": lambda f: (f / "disc_weights.safetensors").write_bytes(
        (f / "disc_weights.safetensors").read_bytes()[:-4096]
    ),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_file_is_refused(artifact_copy, edit):
    EDITS[edit](artifact_copy)
    with pytest.raises(ValueError, match=r"artifact file '[\w.]+' in .*export the model again"):
        _load(artifact_copy)


@pytest.mark.parametrize(
    "name",
    [
        "disc_weights.safetensors",
        "disc_settings.json",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ],
)
def test_missing_file_is_refused(artifact_copy, name):
    (artifact_copy / name).unlink()
    with pytest.raises(ValueError, match=rf"artifact file '{name}' in .* is missing"):
        _load(artifact_copy)


def test_missing_manifest_is_a_clear_error(artifact_copy):
    """Without its manifest the folder is no artifact; nor is it a checkpoint to compile."""
    (artifact_copy / "disc_manifest.json").unlink()
    with pytest.raises(OSError, match="neither a compiled optimum-disc artifact nor"):
        _load(artifact_copy)
    with pytest.raises(artifact.ArtifactNotFoundError, match="disc_manifest.json is missing"):
        artifact.load_artifact(artifact_copy)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format_version=2), r"format_version 2, written by.*reads "),
        (lambda m: m.update(format_version="1"), r"format_version '1'"),
        (lambda m: m.pop("format_version"), r"format_version None"),
        (lambda m: m.update(format="onnx"), r"not an optimum-disc manifest \(format='onnx'\)"),
        (lambda m: m.pop("files"), r"lists no files"),
        (lambda m: m["files"].pop("disc_program.json"), r"does not list \['disc_program.json'\]"),
    ],
    ids=["version-2", "version-str", "no-version", "format", "no-files", "unlisted-program"],
)
def test_manifest_edits_are_refused(artifact_copy, change, message):
    _edit_json(artifact_copy / "disc_manifest.json", change)
    with pytest.raises(ValueError, match=message):
        _load(artifact_copy)


def test_manifest_not_json(artifact_copy):
    (artifact_copy / "disc_manifest.json").write_text('{"format": "optimum-disc", ')
    with pytest.raises(ValueError, match="'disc_manifest.json' .* is not valid JSON"):
        _load(artifact_copy)


def test_other_gpu_architecture_on_this_device(artifact_copy, classifier, caplog, seed):
    """Another architecture in the manifest: a log line (a warning from GPU to GPU), then
    correct results (the case of tests/hf/test_artifact.py::
    test_other_gpu_architecture_loads_and_logs, with a real GPU named and more inputs)."""
    named = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    if DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0):
        named = {"type": "cuda", "name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    _edit_json(artifact_copy / "disc_manifest.json", lambda m: m.update(device=named))
    with caplog.at_level(logging.INFO, logger="optimum_disc"):
        model = _load(artifact_copy)
    line = f"{named['name']} (compute capability {named['compute_capability']})"
    said = [r for r in caplog.records if line in r.getMessage()]
    assert said, [r.getMessage() for r in caplog.records]
    assert said[0].levelno == (logging.WARNING if DEVICE == "cuda" else logging.INFO)
    _assert_correct(model, classifier, seed)


# -- edits that also rewrite the manifest's hashes ---------------------------------------------
#
# The manifest is a checksum list, not a signature: whoever edits a file and its hash gets past
# it. Such edits must still end in a clear error when loading, never in a crash, an unclear
# exception or a read out of bounds later.

REHASHED = {
    "program-not-json": lambda f: (f / "disc_program.json").write_text('{"calls": ['),
    "program-call-missing-inputs": lambda f: _edit_json(
        f / "disc_program.json", lambda p: p["calls"][0].pop("inputs")
    ),
    "program-call-unknown-field": lambda f: _edit_json(
        f / "disc_program.json", lambda p: p["calls"][0].update(code="import os")
    ),
    "program-no-buffers": lambda f: _edit_json(f / "disc_program.json", lambda p: p.pop("buffers")),
    "program-format-version": lambda f: _edit_json(
        f / "disc_program.json", lambda p: p.update(format_version=2)
    ),
    "program-weight-shape": lambda f: _edit_json(
        f / "disc_program.json",
        lambda p: p["weights"][_first(p["weights"])].update(shape=[1]),
    ),
    "program-output-class": lambda f: _edit_json(
        f / "disc_program.json", lambda p: p.update(output_class="os.system")
    ),
    "weights-dropped": lambda f: _edit_weights(f, lambda w: w.pop(_first(w))),
    "weights-shape": lambda f: _edit_weights(
        f, lambda w: w.update({_first(w): w[_first(w)][:-1].clone()})
    ),
    "weights-dtype": lambda f: _edit_weights(
        f, lambda w: w.update({_first(w): w[_first(w)].double()})
    ),
    "weights-not-safetensors": lambda f: (f / "disc_weights.safetensors").write_bytes(b"\xff" * 64),
    "settings-unknown": lambda f: _edit_json(
        f / "disc_settings.json", lambda s: s.update(run="import os")
    ),
    "settings-invalid": lambda f: _edit_json(
        f / "disc_settings.json", lambda s: s.update(max_cuda_graphs=0)
    ),
}


@pytest.mark.parametrize("edit", list(REHASHED))
def test_rehashed_edit_is_a_clear_error(artifact_copy, edit):
    REHASHED[edit](artifact_copy)
    rehash(artifact_copy)
    with pytest.raises(ValueError, match=r"(export|disc_)"):
        _load(artifact_copy)


PROGRAM_DEFECTS = {
    "unknown-kernel": (
        lambda p: p["calls"][1].update(kernel="evil"),
        "program.py: Program.check does not check kernel names; the first call fails with "
        "KeyError: 'evil'",
    ),
    "unknown-dtype": (
        lambda p: [b.update(dtype="nonexistent") for b in p["buffers"].values()],
        "program.py: Buffer does not check its dtype; the first call fails with AttributeError",
    ),
    "vocab-beyond-table": (
        lambda p: p["meta"].update(vocab_size=10**6),
        "runtime.py: the id check uses meta['vocab_size'], not the embedding table's rows; a "
        "larger value lets ids read past the table (a segmentation fault on the CPU)",
    ),
    "positions-beyond-table": (
        lambda p: p["meta"].update(max_position_embeddings=10**6),
        "runtime.py: the length check uses meta['max_position_embeddings'], not the position "
        "table's rows; longer inputs read past the table",
    ),
    "output-class-not-a-model-output": (
        lambda p: p.update(output_class="transformers.modeling_outputs.torch"),
        "runtime.py: any name in transformers.modeling_outputs is taken as the output class; "
        "the first call fails with TypeError: 'module' object is not callable",
    ),
}


@pytest.mark.parametrize(
    "edit",
    [pytest.param(name, id=name) for name in PROGRAM_DEFECTS],
)
def test_rehashed_program_is_checked_when_loading(artifact_copy, edit):
    """Refused when loading; the model is never called here (a read past a table can crash
    the process)."""
    _edit_json(artifact_copy / "disc_program.json", PROGRAM_DEFECTS[edit][0])
    rehash(artifact_copy)
    with pytest.raises(ValueError, match=r"export"):
        _load(artifact_copy)


# -- no pickle, no code from the folder --------------------------------------------------------


class _Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _plant(folder: Path, marker: Path) -> None:
    torch.save({"weight": _Payload(marker)}, folder / "pytorch_model.bin")
    (folder / "disc_program.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    code = f"open({str(marker)!r}, 'w').write('pwned')\n"
    for name in ("__init__.py", "modeling_disc.py", "configuration_bert.py", "custom.py"):
        (folder / name).write_text(code)


def test_payloads_in_the_folder_are_never_run(artifact_copy, classifier, tmp_path, seed):
    marker = tmp_path / "marker"
    # The payload is live: unpickling a copy of it creates its marker.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()
    _plant(artifact_copy, marker)
    model = _load(artifact_copy)
    assert not marker.exists(), "loading ran code from the folder"
    _assert_correct(model, classifier, seed)
    assert not marker.exists()
    assert str(artifact_copy) not in sys.path


def test_remote_code_named_by_the_config_is_not_run(artifact_copy, classifier, tmp_path, seed):
    """config.json and tokenizer_config.json point at code in the folder (auto_map), with the
    manifest rewritten to match: the code is still never imported."""
    marker = tmp_path / "marker"
    code = f"open({str(marker)!r}, 'w').write('pwned')\n"
    (artifact_copy / "configuration_evil.py").write_text(code + "EvilConfig = None\n")
    (artifact_copy / "tokenization_evil.py").write_text(code + "EvilTokenizer = None\n")
    _edit_json(
        artifact_copy / "config.json",
        lambda c: c.update(auto_map={"AutoConfig": "configuration_evil.EvilConfig"}),
    )
    _edit_json(
        artifact_copy / "tokenizer_config.json",
        lambda c: c.update(auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}),
    )
    _edit_json(
        artifact_copy / "disc_manifest.json",
        lambda m: m["files"].update({"configuration_evil.py": {}, "tokenization_evil.py": {}}),
    )
    rehash(artifact_copy)
    try:
        model = _load(artifact_copy)
    except ValueError as e:  # refusing is fine too, if it says why
        assert "trust_remote_code" in str(e) or "custom code" in str(e), e
    else:
        _assert_correct(model, classifier, seed)
    assert not marker.exists(), "loading ran code from the folder"


def test_files_the_manifest_does_not_list_change_nothing(artifact_copy, classifier, seed):
    """Tokenizer files dropped into the folder after saving are not read: the tokenizer is the
    one that was saved (a planted special_tokens_map.json would otherwise swap [CLS])."""
    reference = _load(artifact_copy).tokenizer
    (artifact_copy / "special_tokens_map.json").write_text(json.dumps({"cls_token": "w5"}))
    (artifact_copy / "added_tokens.json").write_text(json.dumps({"w1 w2": 7}))
    model = _load(artifact_copy)
    for text in ("w1 w2", *TEXTS):
        assert model.tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
    assert model.tokenizer.cls_token == "[CLS]"
    _assert_correct(model, classifier, seed)


# -- a save killed half-way --------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    scenario, source, target, ready = sys.argv[1:5]
    import optimum_disc
    from optimum_disc import artifact
    from optimum_disc.modeling import DiscModelForSequenceClassification

    model = DiscModelForSequenceClassification.from_pretrained(source, device="cpu")

    def pause():
        Path(ready).write_text("ready")
        time.sleep(600)  # killed here

    if scenario == "mid-write":
        import safetensors.torch

        real_save = safetensors.torch.save_file

        def save_half(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            pause()

        safetensors.torch.save_file = save_half
    elif scenario == "at-swap":
        # Right after the first step that moves the previous artifact (or swaps it).
        real_rename = os.rename

        def rename(src, dst, *args, **kwargs):
            real_rename(src, dst, *args, **kwargs)
            if os.path.abspath(src) == os.path.abspath(target):
                pause()

        os.rename = rename
        exchange = getattr(artifact, "_exchange", None)
        if exchange is not None:

            def exchange_then_pause(a, b):
                done = exchange(a, b)
                if done:
                    pause()
                return done

            artifact._exchange = exchange_then_pause
    model.save_pretrained(target)
    print("saved")
    """
)


@pytest.mark.parametrize("scenario", ["mid-write", "at-swap"])
def test_killed_save_leaves_a_loadable_artifact(saved, classifier, tmp_path, scenario, seed):
    """SIGKILL while the weights are half written, or right at the swap: the folder still
    holds a complete, verified artifact that gives correct results; killed before the swap,
    it is the previous one, byte for byte."""
    target = tmp_path / "model"
    import shutil

    shutil.copytree(saved, target)
    before = digests(target)
    script, ready = tmp_path / "child.py", tmp_path / "ready"
    script.write_text(_CHILD)
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    child = subprocess.Popen(
        [sys.executable, str(script), scenario, str(saved), str(target), str(ready)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"the save never reached the kill point: {child.poll()}"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        output = child.communicate()[0].decode(errors="replace")
    assert child.returncode == -signal.SIGKILL, output
    assert "saved" not in output
    if scenario == "mid-write":
        assert digests(target) == before
    assert artifact.artifact_files(target) == sorted(before), "not the complete artifact"
    _assert_correct(_load(target), classifier, seed)


# -- push_to_hub -------------------------------------------------------------------------------


def test_push_uploads_only_the_artifact_without_secrets(artifact_copy, classifier, monkeypatch):
    """Files planted beside the artifact (a token file, a pickle, notes) stay local, and no
    uploaded file holds the token, an environment value or a local path. The HTTP-level upload
    is tests/hf/test_hub.py::test_push_to_hub_creates_the_repo_and_one_commit_of_the_artifact."""
    import huggingface_hub

    token, secret = "hf_ReliabilityTestToken0123456789abcdef", "env-sentinel-5d1c9e"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("DISC_RELIABILITY_SECRET", secret)
    (artifact_copy / ".env").write_text(f"HF_TOKEN={token}\n")
    (artifact_copy / "notes.txt").write_text(secret)
    torch.save({"w": torch.zeros(1)}, artifact_copy / "pytorch_model.bin")
    calls = {}

    def create_repo(self, **kwargs):
        calls["repo"] = kwargs
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def create_commit(self, **kwargs):
        calls["commit"] = kwargs
        return type("Info", (), {"commit_url": "https://huggingface.co/org/m/commit/0"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    url = classifier.disc.push_to_hub(artifact_copy, "org/m", token=token)
    assert url.endswith("/commit/0")
    uploaded = {
        op.path_in_repo: Path(op.path_or_fileobj).read_bytes()
        for op in calls["commit"]["operations"]
    }
    listed = json.loads((artifact_copy / "disc_manifest.json").read_text())["files"]
    assert sorted(uploaded) == sorted([*listed, "disc_manifest.json"])
    for name, data in uploaded.items():
        for needle in (token, secret, str(artifact_copy), str(classifier.path), os.getcwd()):
            assert needle.encode() not in data, f"{needle!r} in {name}"
