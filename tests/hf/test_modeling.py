"""The Disc model classes against the eager transformers models they were compiled from.

Tolerance: fp32 compiled against eager fp32, every element within 1e-4 of the output's scale.
With padding removed (the default), token-level outputs at padding positions are zeros.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from optimum_disc import DiscSettings
from optimum_disc.modeling import (
    DiscModel,
    DiscModelForSequenceClassification,
    DiscModelForTokenClassification,
    infer_task,
)

from .hf_helpers import (
    DEVICE,
    HEADS,
    assert_close,
    disc_class,
    padded_batch,
)

TEXTS = ["the movie was great", "a boring plot and a bad actor , not fun at all"]
OUTPUT_CLASSES = {
    "text-classification": SequenceClassifierOutput,
    "feature-extraction": BaseModelOutputWithPoolingAndCrossAttentions,
    "token-classification": TokenClassifierOutput,
    "question-answering": QuestionAnsweringModelOutput,
    "fill-mask": MaskedLMOutput,
}


def _eager(ckpt, batch):
    with torch.no_grad():
        return ckpt.eager(**batch)


@pytest.mark.parametrize(
    "task",
    [task for task in HEADS],
)
def test_outputs_match_eager(tiny, task):
    ckpt, model = tiny.checkpoint(task), tiny.model(task)
    batch = padded_batch(ckpt.tokenizer, TEXTS)
    mask = batch["attention_mask"].bool()
    assert not mask.all(), "the batch must hold padding"
    out = model(**batch)
    ref = _eager(ckpt, batch)
    assert type(out) is OUTPUT_CLASSES[task], ckpt
    assert list(out.keys()) == [k for k, v in ref.items() if v is not None]
    for name, expected in ref.items():
        if expected is None:
            continue
        actual = out[name]
        assert actual.device.type == torch.device(DEVICE).type
        if expected.dim() >= 2 and expected.shape[:2] == mask.shape:
            # token-level: real tokens match, padding positions are zeros (padding removed)
            assert_close(actual[mask], expected[mask], f"{ckpt} {name}")
            assert torch.count_nonzero(actual[~mask]) == 0, f"{ckpt} {name} at padding"
        else:
            assert_close(actual, expected, f"{ckpt} {name}")


def test_tuple_output_and_loss_like_transformers(tiny):
    ckpt, model = tiny.checkpoint("text-classification"), tiny.model("text-classification")
    batch = padded_batch(ckpt.tokenizer, TEXTS)
    labels = torch.tensor([2, 0])
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"],
        labels=labels,
        return_dict=False,
    )
    ref = ckpt.eager(**batch, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2
    assert_close(out[0], ref[0].detach(), f"{ckpt} loss")
    assert_close(out[1], ref[1].detach(), f"{ckpt} logits")


def test_question_answering_loss(tiny):
    ckpt, model = tiny.checkpoint("question-answering"), tiny.model("question-answering")
    batch = padded_batch(ckpt.tokenizer, ["who lives in paris"], ["alice lives in paris"])
    start, end = torch.tensor([7]), torch.tensor([9])
    out = model(**batch, start_positions=start, end_positions=end)
    ref = ckpt.eager(**batch, start_positions=start, end_positions=end)
    assert_close(out.loss, ref.loss.detach(), f"{ckpt} loss")


def test_behaves_like_a_transformers_model(tiny):
    ckpt, model = tiny.checkpoint("text-classification"), tiny.model("text-classification")
    assert model.device == torch.device(DEVICE) or model.device.type == DEVICE
    assert model.dtype == torch.float32
    assert model.config.num_labels == 3 and model.config.id2label[2] == "positive"
    assert (
        model.can_generate() is False and DiscModelForSequenceClassification.can_generate() is False
    )
    assert model.to(DEVICE) is model and model.eval() is model
    assert model.to(torch.float32) is model
    with pytest.raises(ValueError, match="precision='fp32'.*export it again"):
        model.to(torch.float16)
    assert model.code.startswith("def program(") and "linear" in model.code
    assert model.coverage and isinstance(model.coverage, dict)
    assert model.settings == DiscSettings()
    assert model.tokenizer is not None and model.tokenizer.vocab_size == len(ckpt.tokenizer)
    assert isinstance(model, DiscModel) and model.task == "text-classification"
    assert "DiscModelForSequenceClassification" in repr(model)
    # positional call, numpy and list inputs, like the original
    ids = ckpt.tokenizer(["the movie was great"], return_tensors="pt")["input_ids"]
    by_list = model(ids.tolist()).logits
    assert_close(by_list, ckpt.eager(ids).logits.detach(), f"{ckpt} list input")


def test_bad_inputs_name_the_value(tiny):
    model = tiny.model("text-classification")
    ids = torch.tensor([[2, 5, 6, 3]])
    with pytest.raises(ValueError, match="input_ids is required"):
        model(attention_mask=torch.ones_like(ids))
    with pytest.raises(ValueError, match="float32.*integer"):
        model(input_ids=ids.float())
    with pytest.raises(ValueError, match="sequence length 70 exceeds max_position_embeddings=64"):
        model(input_ids=torch.full((1, 70), 5))
    with pytest.raises(ValueError, match="attention_mask has shape \\(1, 3\\)"):
        model(input_ids=ids, attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="position_ids is not supported"):
        model(input_ids=ids, position_ids=torch.arange(4)[None])
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(input_ids=ids, output_attentions=True)
    with pytest.raises(TypeError, match="use_cache"):
        model(input_ids=ids, use_cache=False)
    with pytest.raises(ValueError, match="device='tpu:7' is not a device|device='tpu:7'"):
        model.to("tpu:7")


def test_from_pretrained_rejects_unknown_arguments(tiny):
    path = tiny.saved_artifact("text-classification")
    with pytest.raises(TypeError, match="preicsion"):
        DiscModelForSequenceClassification.from_pretrained(path, preicsion="fp16")
    with pytest.raises(ValueError, match="precision='fp4' is not supported"):
        DiscModelForSequenceClassification.from_pretrained(path, precision="fp4")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU.*device='cpu'"):
            DiscModelForSequenceClassification.from_pretrained(path, device="cuda")


def test_loaded_artifact_settings(tiny):
    path = tiny.saved_artifact("text-classification")
    model = DiscModelForSequenceClassification.from_pretrained(
        path, device=DEVICE, cuda_graphs=False, remove_padding=False
    )
    assert model.settings.cuda_graphs is False and model.settings.remove_padding is False
    with pytest.raises(ValueError, match="compiled with precision='fp32'.*export=True"):
        DiscModelForSequenceClassification.from_pretrained(path, device=DEVICE, precision="fp16")
    with pytest.raises(ValueError, match="compiled with precision='fp32'"):
        DiscModelForSequenceClassification.from_pretrained(
            path, device=DEVICE, dtype=torch.bfloat16
        )


def test_artifact_of_another_task_names_the_class(tiny):
    path = tiny.saved_artifact("text-classification")
    with pytest.raises(ValueError, match="text-classification model.*DiscModelForSequenceClass"):
        DiscModelForTokenClassification.from_pretrained(path, device=DEVICE)


def test_folder_without_artifact_exports_with_a_log_line(tiny, caplog):
    """The no-artifact choice: compile the checkpoint (as optimum-onnx does) and say so."""
    ckpt = tiny.checkpoint("token-classification")
    with caplog.at_level(logging.WARNING, logger="optimum_disc"):
        model = DiscModelForTokenClassification.from_pretrained(ckpt.path, device=DEVICE)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("optimum_disc")]
    assert any(
        "holds no compiled optimum-disc artifact" in m and "save_pretrained" in m for m in said
    )
    batch = padded_batch(ckpt.tokenizer, ["alice lives in london"])
    assert_close(model(**batch).logits, ckpt.eager(**batch).logits.detach(), f"{ckpt}")
    assert model.tokenizer is not None, "the tokenizer of the checkpoint is kept"


def test_missing_location_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="nothing-here.*neither a local folder nor a Hub repo"):
        DiscModel.from_pretrained(tmp_path / "nothing-here", device=DEVICE)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match="holds neither a compiled optimum-disc artifact .* nor a"):
        DiscModel.from_pretrained(empty, device=DEVICE)


def test_export_of_an_artifact_folder_says_to_load_it(tiny):
    path = tiny.saved_artifact("text-classification")
    with pytest.raises(OSError, match="holds a compiled optimum-disc artifact but no transformers"):
        DiscModelForSequenceClassification.from_pretrained(path, export=True, device=DEVICE)


def test_infer_task_from_architectures(tiny):
    for task in HEADS:
        assert infer_task(tiny.checkpoint(task).eager.config) == task
        assert disc_class(task).task == task
