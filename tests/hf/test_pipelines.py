"""transformers pipelines over compiled models: silent, and the eager model's answers.

Each Disc pipeline is built and run inside ``no_warnings()``: nothing at WARNING or above from
the ``transformers`` and ``optimum`` loggers, and no Python warning. Labels must equal the eager
pipeline's wherever the eager model's top two scores are more than ``MARGIN`` apart (closer
than that, a rounding difference may legitimately swap them); scores match within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_outputs import QuestionAnsweringModelOutput
from transformers.models.auto import modeling_auto

from optimum_disc.modeling import QuestionAnsweringPipeline, pipeline

from .hf_helpers import assert_close, no_warnings

MARGIN = 1e-3
TOL = 1e-4
LONG = " ".join(["the story was very good and the actor was great but the plot was boring"] * 6)
TEXTS = ["the movie was great", "a boring plot and a bad actor", "i loved it", "not fun", LONG]


def _by_label(result):
    return {r["label"]: r["score"] for r in result}


def _check_classification(got, ref):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        g, r = _by_label(g), _by_label(r)
        assert set(g) == set(r)
        for label in r:
            assert abs(g[label] - r[label]) <= TOL, (label, g, r)
        ranked = sorted(r.values(), reverse=True)
        if ranked[0] - ranked[1] > MARGIN:
            assert max(g, key=g.get) == max(r, key=r.get), (g, r)


def test_sentiment_analysis_pipeline_is_silent_and_matches_eager(tiny):
    ckpt, model = tiny.checkpoint("text-classification"), tiny.model("text-classification")
    with no_warnings():
        classify = transformers.pipeline(
            "sentiment-analysis", model=model, tokenizer=ckpt.tokenizer
        )
        got = classify(TEXTS, batch_size=2, truncation=True, top_k=None)
        top = classify(TEXTS[:2])
    eager = transformers.pipeline(
        "sentiment-analysis", model=ckpt.eager, tokenizer=ckpt.tokenizer, device="cpu"
    )
    ref = eager(TEXTS, batch_size=2, truncation=True, top_k=None)
    _check_classification(got, ref)
    ref_top = eager(TEXTS[:2])
    assert [r["label"] for r in top] == [r["label"] for r in ref_top] or any(
        sorted(_by_label(r).values())[-1] - sorted(_by_label(r).values())[-2] <= MARGIN
        for r in ref[:2]
    )
    assert [round(r["score"], 4) for r in top] == pytest.approx(
        [r["score"] for r in ref_top], abs=TOL
    )


def test_pipeline_from_a_folder_or_a_loaded_model_with_its_tokenizer(tiny):
    ckpt = tiny.checkpoint("text-classification")
    folder = tiny.saved_artifact("text-classification")
    eager = transformers.pipeline(
        "text-classification", model=ckpt.eager, tokenizer=ckpt.tokenizer, device="cpu"
    )
    ref = eager(TEXTS[:3], top_k=None)
    with no_warnings():
        from_folder = pipeline("text-classification", model=str(folder))
        got = from_folder(TEXTS[:3], top_k=None)
        from_model = pipeline("sentiment-analysis", model=from_folder.model)
        again = from_model(TEXTS[:3], top_k=None, batch_size=3)
    _check_classification(got, ref)
    _check_classification(again, ref)


def test_the_registration_is_what_keeps_pipelines_silent(tiny, monkeypatch):
    """Without the class name in transformers' list, the pipeline logs an error."""
    ckpt, model = tiny.checkpoint("text-classification"), tiny.model("text-classification")
    names = modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    monkeypatch.delitem(names, "optimum-disc")
    with (
        pytest.raises(AssertionError, match="is not supported for text-classification"),
        no_warnings(),
    ):
        transformers.pipeline("text-classification", model=model, tokenizer=ckpt.tokenizer)


def test_feature_extraction_pipeline(tiny):
    ckpt, model = tiny.checkpoint("feature-extraction"), tiny.model("feature-extraction")
    texts = ["alice eats apples", "paris"]
    with no_warnings():
        extract = transformers.pipeline("feature-extraction", model=model, tokenizer=ckpt.tokenizer)
        got = extract(texts, return_tensors=True)
    eager = transformers.pipeline(
        "feature-extraction", model=ckpt.eager, tokenizer=ckpt.tokenizer, device="cpu"
    )
    ref = eager(texts, return_tensors=True)
    for g, r in zip(got, ref):
        assert_close(g, r, f"{ckpt} features")


def test_token_classification_pipeline(tiny):
    ckpt, model = tiny.checkpoint("token-classification"), tiny.model("token-classification")
    texts = ["alice lives in paris", "bob eats pears in london today"]
    with no_warnings():
        tag = transformers.pipeline("ner", model=model, tokenizer=ckpt.tokenizer)
        got = tag(texts, ignore_labels=[], batch_size=2)
        grouped = tag(texts[0], aggregation_strategy="simple", ignore_labels=[])
    eager = transformers.pipeline("ner", model=ckpt.eager, tokenizer=ckpt.tokenizer, device="cpu")
    ref = eager(texts, ignore_labels=[], batch_size=2)
    ref_grouped = eager(texts[0], aggregation_strategy="simple", ignore_labels=[])
    for text, g_tokens, r_tokens in zip(texts, got, ref):
        batch = ckpt.tokenizer(text, return_tensors="pt")
        logits = ckpt.eager(**batch).logits[0].detach()
        top2 = logits.softmax(-1).topk(2).values
        assert [t["index"] for t in g_tokens] == [t["index"] for t in r_tokens]
        for g, r in zip(g_tokens, r_tokens):
            assert (g["word"], g["start"], g["end"]) == (r["word"], r["start"], r["end"])
            assert abs(g["score"] - r["score"]) <= TOL
            margin = top2[r["index"], 0] - top2[r["index"], 1]
            if margin > MARGIN:
                assert g["entity"] == r["entity"], (text, g, r)
    assert len(grouped) == len(ref_grouped)
    for g, r in zip(grouped, ref_grouped):
        assert abs(g["score"] - r["score"]) <= TOL


def test_fill_mask_pipeline(tiny):
    ckpt, model = tiny.checkpoint("fill-mask"), tiny.model("fill-mask")
    texts = ["alice eats [MASK] today", "the [MASK] was great"]
    with no_warnings():
        fill = transformers.pipeline("fill-mask", model=model, tokenizer=ckpt.tokenizer)
        got = fill(texts, top_k=5)
    eager = transformers.pipeline(
        "fill-mask", model=ckpt.eager, tokenizer=ckpt.tokenizer, device="cpu"
    )
    ref = eager(texts, top_k=5)
    for g, r in zip(got, ref):
        assert [x["score"] for x in g] == pytest.approx([x["score"] for x in r], abs=TOL)
        scores = [x["score"] for x in r]
        for i, (gx, rx) in enumerate(zip(g, r)):
            apart = all(abs(scores[i] - s) > MARGIN for j, s in enumerate(scores) if j != i)
            if apart:
                assert gx["token"] == rx["token"] and gx["sequence"] == rx["sequence"]


def test_question_answering_pipeline(tiny):
    ckpt, model = tiny.checkpoint("question-answering"), tiny.model("question-answering")
    context = "alice lives in paris and bob lives in london . " + LONG
    questions = ["who lives in paris", "where does bob live"]
    with no_warnings():
        answer = pipeline("question-answering", model=model)
        got = answer(question=questions, context=context, max_seq_len=48, doc_stride=16, top_k=3)
        single = answer({"question": questions[0], "context": context[:60]})
    eager = QuestionAnsweringPipeline(model=ckpt.eager, tokenizer=ckpt.tokenizer, device="cpu")
    ref = eager(question=questions, context=context, max_seq_len=48, doc_stride=16, top_k=3)
    ref_single = eager({"question": questions[0], "context": context[:60]})
    assert len(got) == len(ref) == 2
    for g, r in zip(got, ref):
        assert [x["score"] for x in g] == pytest.approx([x["score"] for x in r], abs=TOL)
        if r[0]["score"] - r[1]["score"] > MARGIN:
            assert (g[0]["start"], g[0]["end"], g[0]["answer"]) == (
                r[0]["start"],
                r[0]["end"],
                r[0]["answer"],
            )
        assert all(x["answer"] == context[x["start"] : x["end"]] for x in g)
    assert single["score"] == pytest.approx(ref_single["score"], abs=TOL)


def test_pipeline_errors_name_what_to_do(tiny, tmp_path):
    model = tiny.model("text-classification")
    with pytest.raises(ValueError, match="task='translation' is not supported"):
        pipeline("translation", model=model)
    with pytest.raises(ValueError, match="needs a DiscModelForTokenClassification"):
        pipeline("ner", model=model)
    with pytest.raises(TypeError, match="for a transformers model use transformers.pipeline"):
        pipeline("text-classification", model=torch.nn.Linear(2, 2))
    bare = type(model)(model.model, model.config, preprocessors=[])
    with pytest.raises(ValueError, match="no tokenizer.*pass tokenizer="):
        pipeline("text-classification", model=bare)


class _Pointing(transformers.BertForQuestionAnswering):
    """Start and end logits that point at every occurrence of one token id."""

    target = None

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        hit = (input_ids == self.target).float() * 10.0
        return QuestionAnsweringModelOutput(start_logits=hit, end_logits=hit)


def test_question_answering_pipeline_picks_the_span_in_the_context(tiny):
    """The pipeline's own logic, on logits with a known answer (no compiled model needed)."""
    tokenizer = tiny.checkpoint("question-answering").tokenizer
    model = _Pointing(tiny.checkpoint("question-answering").eager.config).eval()
    model.target = tokenizer.convert_tokens_to_ids("paris")
    answer = QuestionAnsweringPipeline(model=model, tokenizer=tokenizer, device="cpu")
    # "paris" is in the question too: only the context may answer, in every window
    context = "bob eats apples in london today . " * 5 + "alice lives in paris"
    got = answer(question="who lives in paris", context=context, max_seq_len=24, doc_stride=8)
    start = context.index("paris")
    assert (got["start"], got["end"], got["answer"]) == (start, start + 5, "paris")
    assert got["score"] > 0.9
    top = answer({"question": "who", "context": context}, top_k=2, max_seq_len=24, doc_stride=8)
    assert [t["answer"] for t in top][0] == "paris" and len(top) == 2


@pytest.mark.parametrize(("max_seq_len", "doc_stride"), [(24, 8), (48, 16), (20, 0)])
def test_question_answering_windows_cover_the_whole_context(tiny, max_seq_len, doc_stride):
    """[CLS] question [SEP] slice [SEP] windows whose slices run from the context's first token
    to its last, each sharing doc_stride tokens with the one before (tokenizers 0.23.1 and 0.23.2
    return overflowing windows that stop short of a long context)."""
    ckpt = tiny.checkpoint("question-answering")
    tokenizer = ckpt.tokenizer
    answer = QuestionAnsweringPipeline(model=ckpt.eager, tokenizer=tokenizer, device="cpu")
    question = "where does bob live"
    context = "alice lives in paris and bob lives in london . " + LONG
    whole = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    asked = tokenizer(question, add_special_tokens=False)["input_ids"]
    windows = answer.preprocess(
        {"question": question, "context": context}, max_seq_len=max_seq_len, doc_stride=doc_stride
    )
    ids, mask = windows["model_inputs"]["input_ids"], windows["context_mask"]
    assert ids.shape[1] <= max_seq_len and len(ids) > 2
    head = [tokenizer.cls_token_id, *asked, tokenizer.sep_token_id]
    end = 0
    for w in range(len(ids)):
        assert ids[w, : len(head)].tolist() == head
        offsets = windows["offsets"][w][mask[w]].tolist()
        # each window starts doc_stride tokens before the end of the one before
        begin = end - doc_stride if w else 0
        end = begin + len(offsets)
        assert offsets == [list(o) for o in whole["offset_mapping"][begin:end]], (w, begin)
        assert ids[w][mask[w]].tolist() == whole["input_ids"][begin:end]
        assert ids[w, len(head) + len(offsets)] == tokenizer.sep_token_id
    assert end == len(whole["input_ids"])
