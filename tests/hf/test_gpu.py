"""On a CUDA GPU: half precision, the GPU architecture in the manifest, tuned choices kept.

fp16 compiled against eager fp32: every element within 2e-2 of the output's scale.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from optimum_disc.modeling import DiscModelForSequenceClassification

from .hf_helpers import assert_close, no_warnings, padded_batch

pytestmark = pytest.mark.gpu

TEXTS = ["the movie was great", "a boring plot and a bad actor , not fun at all"]


def test_fp16_on_the_gpu_saves_its_architecture_and_tuning(tiny, tmp_path):
    ckpt = tiny.checkpoint("text-classification")
    model = DiscModelForSequenceClassification.from_pretrained(
        ckpt.path, export=True, device="cuda", precision="fp16"
    )
    assert model.device == torch.device("cuda", torch.cuda.current_device())
    assert model.dtype == torch.float16
    batch = padded_batch(ckpt.tokenizer, TEXTS)
    out = model(**batch).logits
    assert out.device.type == "cuda" and out.dtype == torch.float32
    with torch.no_grad():
        ref = ckpt.eager(**batch).logits
    assert_close(out, ref, f"{ckpt} fp16", rel=2e-2)

    model.save_pretrained(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "disc_manifest.json").read_text())
    major, minor = torch.cuda.get_device_capability()
    assert manifest["device"]["type"] == "cuda"
    assert manifest["device"]["compute_capability"] == f"{major}.{minor}"
    saved = json.loads((tmp_path / "m" / "disc_program.json").read_text())
    assert saved["tuning"] == model.program.tuning

    loaded = DiscModelForSequenceClassification.from_pretrained(tmp_path / "m", device="cuda:0")
    assert loaded.device == torch.device("cuda", 0) and loaded.program.tuning == saved["tuning"]
    assert_close(loaded(**batch).logits, out, f"{ckpt} reloaded", rel=1e-3)
    with no_warnings():
        classify = transformers.pipeline(
            "text-classification", model=loaded, tokenizer=loaded.tokenizer
        )
        got = classify(TEXTS)
    assert classify.device.type == "cuda" and len(got) == 2
