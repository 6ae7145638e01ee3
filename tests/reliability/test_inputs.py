"""Bad and unusual inputs, through the compiled model and through the Disc model class.

Each bad input gets a ValueError whose message names the offending value (or shape, or dtype),
and the next valid call still matches eager. Unusual but valid inputs (views, bool masks, rows
of padding only, empty strings) give the eager model's results within RTOL.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from .helpers import DEVICE, compare, eager, random_inputs

SURFACES = ("compiled", "disc")


def _call(classifier, surface):
    return classifier.disc.model if surface == "compiled" else classifier.disc


def _good(seed: int) -> dict:
    return random_inputs(torch.Generator().manual_seed(seed), 2, 5, "right")


def _replace(good: dict, **changes) -> dict:
    return {**good, **changes}


def _at(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


# (id, inputs from the good ones, the message it must raise)
BAD = [
    ("id-negative", lambda g: _replace(g, input_ids=_at(g["input_ids"], (0, 1), -3)), r"id -3,"),
    (
        "id-past-vocab",
        lambda g: _replace(g, input_ids=_at(g["input_ids"], (1, 2), 99)),
        r"token id 99, outside the vocabulary \[0, 99\)",
    ),
    ("id-huge", lambda g: _replace(g, input_ids=_at(g["input_ids"], (1, 0), 2**40)), r"id 10995"),
    (
        "too-long",
        lambda g: {k: v.repeat(1, 7)[:, :33] for k, v in g.items()},
        r"sequence length 33 exceeds max_position_embeddings=32",
    ),
    ("empty-batch", lambda g: {k: v[:0] for k, v in g.items()}, r"shape \(0, 5\).*empty"),
    ("empty-sequence", lambda g: {k: v[:, :0] for k, v in g.items()}, r"shape \(2, 0\).*empty"),
    (
        "mask-shape",
        lambda g: _replace(g, attention_mask=g["attention_mask"][:, :4]),
        r"attention_mask has shape \(2, 4\) but input_ids has \(2, 5\)",
    ),
    (
        "types-shape",
        lambda g: _replace(g, token_type_ids=g["token_type_ids"][:1]),
        r"token_type_ids has shape \(1, 5\) but input_ids has \(2, 5\)",
    ),
    (
        "ids-1d",
        lambda g: {k: v[0] for k, v in g.items()},
        r"input_ids has shape \(5,\); expected \[batch, seq_len\]",
    ),
    (
        "ids-float",
        lambda g: _replace(g, input_ids=g["input_ids"].float()),
        r"input_ids has dtype torch.float32.*integer",
    ),
    (
        # eager transformers accepts a float mask; this model asks for the tokenizer's integers
        "mask-float",
        lambda g: _replace(g, attention_mask=g["attention_mask"].float()),
        r"attention_mask has dtype torch.float32.*integer",
    ),
    (
        "types-past-type-vocab",
        lambda g: _replace(g, token_type_ids=_at(g["token_type_ids"], (0, 0), 2)),
        r"token_type_ids holds 2, outside \[0, 2\)",
    ),
    (
        "types-negative",
        lambda g: _replace(g, token_type_ids=_at(g["token_type_ids"], (1, 3), -1)),
        r"token_type_ids holds -1, outside \[0, 2\)",
    ),
    (
        "position-ids",
        lambda g: _replace(g, position_ids=g["input_ids"]),
        r"position_ids is not supported",
    ),
]


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("make, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error_and_the_next_call_is_right(
    classifier, surface, make, message, seed
):
    model = _call(classifier, surface)
    good = _good(seed)
    with pytest.raises(ValueError, match=message):
        model(**make(good))
    compare(model(**good), eager(classifier.eager, good), good["attention_mask"], True, surface)


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("value", [2, -1])
def test_mask_value_other_than_0_1_error_names_the_value(classifier, surface, value, seed):
    model = _call(classifier, surface)
    good = _good(seed)
    bad = _replace(good, attention_mask=_at(good["attention_mask"], (1, 1), value))
    with pytest.raises(ValueError, match=rf"attention_mask.*(?<![\d-]){value}(?!\d)"):
        model(**bad)


@pytest.mark.parametrize("surface", SURFACES)
def test_mask_value_other_than_0_1_is_refused(classifier, surface, seed):
    model = _call(classifier, surface)
    good = _good(seed)
    for value in (2, -1, 255):
        bad = _replace(good, attention_mask=_at(good["attention_mask"], (1, 1), value))
        with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
            model(**bad)
    compare(model(**good), eager(classifier.eager, good), good["attention_mask"], True, surface)


@pytest.mark.parametrize("surface", SURFACES)
def test_bool_input_ids_are_refused(classifier, surface, seed):
    model = _call(classifier, surface)
    good = _good(seed)
    with pytest.raises(ValueError, match=r"input_ids has dtype torch.bool"):
        model(**_replace(good, input_ids=good["input_ids"] > 50))


def test_compiled_model_refuses_lists_disc_model_converts_them(classifier, seed):
    good = _good(seed)
    as_lists = {k: v.tolist() for k, v in good.items()}
    with pytest.raises(ValueError, match="input_ids must be a torch.Tensor, got list"):
        classifier.disc.model(**as_lists)
    ref = eager(classifier.eager, good)
    compare(classifier.disc(**as_lists), ref, good["attention_mask"], True, "lists")
    as_numpy = {k: np.asarray(v) for k, v in as_lists.items()}
    compare(classifier.disc(**as_numpy), ref, good["attention_mask"], True, "numpy")


def _views(inputs: dict) -> dict[str, dict]:
    """The same values as non-contiguous tensors: transposed, strided, and broadcast views."""
    transposed = {k: v.t().contiguous().t() for k, v in inputs.items()}
    strided = {k: torch.stack([v, torch.zeros_like(v)], -1)[..., 0] for k, v in inputs.items()}
    batch = inputs["input_ids"].shape[0]
    broadcast = {k: v[:1].expand(batch, -1) for k, v in inputs.items()}
    return {"transposed": transposed, "strided": strided, "broadcast": broadcast}


@pytest.mark.parametrize("surface", SURFACES)
def test_non_contiguous_inputs_give_correct_results(classifier, surface, seed):
    model = _call(classifier, surface)
    inputs = random_inputs(torch.Generator().manual_seed(seed), 3, 6, "right")
    for name, views in _views(inputs).items():
        assert all(not v.is_contiguous() for v in views.values()), name
        dense = {k: v.contiguous() for k, v in views.items()}
        compare(model(**views), eager(classifier.eager, dense), dense["attention_mask"], True, name)


@pytest.mark.parametrize("fixture", ["base", "base_padded"])
def test_non_contiguous_inputs_token_level(fixture, request, seed):
    tiny = request.getfixturevalue(fixture)
    inputs = random_inputs(torch.Generator().manual_seed(seed), 3, 7, "random")
    for name, views in _views(inputs).items():
        dense = {k: v.contiguous() for k, v in views.items()}
        ref = eager(tiny.eager, dense)
        compare(tiny.compiled(**views), ref, dense["attention_mask"], tiny.remove_padding, name)


def test_other_integer_dtypes_and_bool_masks_match_eager(classifier, seed):
    """int32 / uint8 ids and bool / int32 masks: what tokenizers and users hand over."""
    inputs = random_inputs(torch.Generator().manual_seed(seed), 3, 6, "left")
    ref = eager(classifier.eager, inputs)
    mask = inputs["attention_mask"]
    variants = {
        "int32": {k: v.int() for k, v in inputs.items()},
        "uint8-ids": {**inputs, "input_ids": inputs["input_ids"].to(torch.uint8)},
        "bool-mask": {**inputs, "attention_mask": mask.bool()},
    }
    for name, variant in variants.items():
        for surface in SURFACES:
            out = _call(classifier, surface)(**variant)
            compare(out, ref, mask, True, f"{surface} {name}")


def test_row_of_padding_only(base, base_padded, classifier, seed):
    """A row whose attention_mask is all zeros.

    transformers' default (sdpa) attention gives a query with no valid key a zero attention
    output; the compiled kernels do the same, so every output matches eager (sdpa) within
    RTOL, finite, with the next calls unaffected. (transformers' ``attn_implementation="eager"``
    instead averages over the masked keys: other finite values, just as arbitrary.) With padding
    removed, the row's token-level outputs are all zeros, like every padding position.
    """
    generator = torch.Generator().manual_seed(seed)
    for tiny in (base, base_padded):
        for batch, seq in ((1, 5), (3, 6)):
            inputs = random_inputs(generator, batch, seq, "right")
            inputs["attention_mask"][batch // 2] = 0
            ref = eager(tiny.eager, inputs)
            out = tiny.compiled(**inputs)
            compare(out, ref, inputs["attention_mask"], tiny.remove_padding, f"{tiny}")
            row = out.last_hidden_state[batch // 2]
            if tiny.remove_padding:
                assert torch.count_nonzero(row) == 0
            assert torch.isfinite(out.pooler_output).all()
        again = random_inputs(generator, 2, 4, "right")
        ref = eager(tiny.eager, again)
        compare(tiny.compiled(**again), ref, again["attention_mask"], tiny.remove_padding)
    inputs = random_inputs(generator, 2, 5, "right")
    inputs["attention_mask"][0] = 0
    for surface in SURFACES:
        out = _call(classifier, surface)(**inputs)
        compare(out, eager(classifier.eager, inputs), inputs["attention_mask"], True, surface)


def test_pipeline_on_empty_strings_matches_eager(classifier):
    """The tokenizer turns "" into [CLS] [SEP]: an ordinary two-token input."""
    texts = ["", ""]
    assert classifier.tokenizer(texts)["input_ids"] == [[2, 3], [2, 3]]
    classify = transformers.pipeline(
        "text-classification", model=classifier.disc, tokenizer=classifier.tokenizer
    )
    reference = transformers.pipeline(
        "text-classification",
        model=classifier.eager,
        tokenizer=classifier.tokenizer,
        device=torch.device(DEVICE),
    )
    for kwargs in ({"top_k": None}, {"top_k": None, "batch_size": 2}, {}):
        got, want = classify(texts, **kwargs), reference(texts, **kwargs)
        assert len(got) == len(want) == 2
        for g, w in zip(got, want):
            g, w = (g if isinstance(g, list) else [g]), (w if isinstance(w, list) else [w])
            g = {r["label"]: r["score"] for r in g}
            w = {r["label"]: r["score"] for r in w}
            assert set(g) == set(w)
            assert all(abs(g[k] - w[k]) <= 1e-4 for k in w), (g, w)


@pytest.mark.gpu
@pytest.mark.parametrize("surface", SURFACES)
def test_cpu_tensors_given_to_a_gpu_model(classifier, surface, seed):
    model = _call(classifier, surface)
    assert model.device.type == "cuda"
    inputs = random_inputs(torch.Generator().manual_seed(seed), 3, 9, "right", device="cpu")
    out = model(**inputs)
    assert out.logits.device.type == "cuda"
    on_gpu = {k: v.cuda() for k, v in inputs.items()}
    compare(out, eager(classifier.eager, on_gpu), inputs["attention_mask"], True, surface)
