"""The Hub, without a network: uploads checked at the HTTP boundary, loads through a cache."""

from __future__ import annotations

import base64
import hashlib
import json
import os

import huggingface_hub
import pytest
from huggingface_hub.utils import _http as hub_http

from optimum_disc.modeling import DiscModelForSequenceClassification

from .hf_helpers import DEVICE, assert_close, padded_batch

TASK = "text-classification"
TOKEN = "hf_FakeTokenForTestsOnly0123456789abcdef"
SECRET = "env-sentinel-7f3a9c1e"
# huggingface_hub 1.x uses httpx, 2.x its fork httpx2: use whichever it uses.
httpx = getattr(hub_http, "httpx2", None) or hub_http.httpx


class FakeHub:
    """An httpx transport that answers the Hub's repo-creation and commit endpoints."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict, bytes]] = []

    def __call__(self, request):
        body = request.read()
        path = request.url.path
        self.requests.append((request.method, path, dict(request.headers), body))
        if request.method == "POST" and path == "/api/repos/create":
            return httpx.Response(200, json={"url": "https://huggingface.co/org/tiny-disc"})
        if request.method == "POST" and "/preupload/" in path:
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
            ]
            return httpx.Response(200, json={"files": modes})
        if request.method == "POST" and "/commit/" in path:
            oid = "c" * 40
            return httpx.Response(
                200,
                json={
                    "commitUrl": f"https://huggingface.co/org/tiny-disc/commit/{oid}",
                    "commitOid": oid,
                },
            )
        return httpx.Response(404, json={"error": f"not served by the test: {path}"})

    def posts(self, fragment):
        return [r for r in self.requests if r[0] == "POST" and fragment in r[1]]


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    # The requests go to the fake transport below, so the tests run even where the environment
    # sets the Hub offline (huggingface_hub refuses every request in offline mode).
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def client():
        return httpx.Client(
            transport=httpx.MockTransport(hub),
            event_hooks={"request": [hub_http.hf_request_event_hook]},
            follow_redirects=True,
        )

    huggingface_hub.close_session()
    huggingface_hub.set_client_factory(client)
    yield hub
    huggingface_hub.close_session()
    huggingface_hub.set_client_factory(hub_http.default_client_factory)


def test_push_to_hub_creates_the_repo_and_one_commit_of_the_artifact(
    tiny, artifact_copy, fake_hub, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("DISC_TEST_SECRET", SECRET)
    folder = artifact_copy(TASK)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    url = tiny.model(TASK).push_to_hub(folder, "org/tiny-disc", private=True, token=TOKEN)

    assert url.endswith("/commit/" + "c" * 40)
    (create,) = fake_hub.posts("/api/repos/create")
    request = json.loads(create[3])
    assert (request["organization"], request["name"]) == ("org", "tiny-disc")
    assert request.get("private") is True or request.get("visibility") == "private"
    assert create[2]["authorization"] == f"Bearer {TOKEN}"
    (commit,) = fake_hub.posts("/api/models/org/tiny-disc/commit/main")
    assert commit[2]["authorization"] == f"Bearer {TOKEN}"
    lines = [json.loads(line) for line in commit[3].decode().splitlines() if line.strip()]
    uploaded = {
        line["value"]["path"]: base64.b64decode(line["value"]["content"])
        for line in lines
        if line["key"] == "file"
    }
    assert sorted(uploaded) == files
    assert not [line for line in lines if line["key"] not in ("header", "file")]
    for name, data in uploaded.items():
        assert data == (folder / name).read_bytes(), name
        for secret in (TOKEN, SECRET, str(folder), str(folder.parent), os.getcwd()):
            assert secret.encode() not in data, f"{secret!r} in {name}"


def test_push_refuses_a_corrupt_artifact(tiny, artifact_copy, fake_hub):
    folder = artifact_copy(TASK)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="'config.json'.*export the model again"):
        tiny.model(TASK).push_to_hub(folder, "org/tiny-disc", token=TOKEN)
    assert not fake_hub.requests


def test_save_pretrained_with_push_to_hub(tiny, tmp_path, fake_hub):
    tiny.model(TASK).save_pretrained(
        tmp_path / "m", push_to_hub=True, repository_id="org/tiny-disc", token=TOKEN
    )
    assert len(fake_hub.posts("/api/repos/create")) == 1
    assert len(fake_hub.posts("/commit/main")) == 1


def _populate_cache(cache, repo_id: str, folder, revision: str):
    """The Hugging Face cache layout: blobs, a snapshot of links to them, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / revision
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_from_pretrained_repo_id_through_the_cache_offline(tiny, tmp_path, fake_hub, monkeypatch):
    ckpt = tiny.checkpoint(TASK)
    cache = tmp_path / "hub-cache"
    _populate_cache(cache, "org/tiny-disc", tiny.saved_artifact(TASK), "0123456789" * 4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    model = DiscModelForSequenceClassification.from_pretrained(
        "org/tiny-disc", cache_dir=str(cache), device=DEVICE
    )

    assert not fake_hub.requests, "offline: no request may leave"
    assert model.artifact_manifest["task"] == TASK
    assert model.tokenizer is not None
    batch = padded_batch(model.tokenizer, ["bob hated the plot", "fun"])
    assert_close(model(**batch).logits, ckpt.eager(**batch).logits.detach(), f"{ckpt}")


def test_tampered_cache_entry_is_refused(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    _populate_cache(cache, "org/tiny-disc", tiny.saved_artifact(TASK), "0123456789" * 4)
    blob_dir = cache / "models--org--tiny-disc" / "blobs"
    snapshot = cache / "models--org--tiny-disc" / "snapshots" / ("0123456789" * 4)
    weights = (snapshot / "disc_weights.safetensors").resolve()
    assert weights.parent == blob_dir.resolve()
    weights.write_bytes(weights.read_bytes()[:-10])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="'disc_weights.safetensors'.*export the model again"):
        DiscModelForSequenceClassification.from_pretrained(
            "org/tiny-disc", cache_dir=str(cache), device=DEVICE
        )
