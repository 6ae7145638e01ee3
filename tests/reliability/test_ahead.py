"""Graphs launched ahead of the statistics: a shape whose last calls took one graph that
computes every position of its bucket replays it before the input checks; the results are those
of the call's own inputs, a wrong guess is corrected in the same call, and inputs that the checks
refuse still raise, with nothing out of bounds on the device.

Results against eager fp32 within the reliability tolerance (``helpers.RTOL`` of the output's
scale), every element; repeated inputs bitwise equal to their first results.
"""

from __future__ import annotations

import pytest
import torch

from optimum_disc import DiscSettings, optimize
from optimum_disc.compiler import runtime

from .helpers import compare, eager, random_inputs


@pytest.fixture
def replays(monkeypatch):
    """Every CUDA graph replayed while the test runs, in order."""
    replayed = []
    real_replay = torch.cuda.CUDAGraph.replay

    def counting_replay(graph):
        replayed.append(graph)
        return real_replay(graph)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counting_replay)
    return replayed


def _full(b_pad, s_pad):
    return (True, b_pad, s_pad, b_pad * s_pad)


def test_a_shape_is_guessed_after_two_calls_of_one_full_key(base):
    """The bookkeeping alone (CPU too): two calls of one key that computes every position make
    a guess; a key with padding removed, another key, or too many misses stop it."""
    model = base.compiled
    saved = model._streaks
    model._streaks = {}
    try:
        full, other = _full(8, 16), _full(8, 20)
        assert model._guess(8, 16) is None
        model._note(8, 16, full, None)
        assert model._guess(8, 16) is None  # one call is no streak yet
        model._note(8, 16, full, None)
        assert model._guess(8, 16) == full
        assert model._guess(8, 17) is None  # per (batch, seq)
        # Padding removed (fewer rows than the bucket's positions): never guessed.
        model._note(8, 16, (True, 8, 16, 64), full)
        assert model._streaks[(8, 16)] == (None, 0, 1)
        assert model._guess(8, 16) is None
        model._note(8, 16, full, None)
        model._note(8, 16, full, None)
        assert model._guess(8, 16) == full
        # A different full key restarts the streak.
        model._note(8, 16, other, full)
        assert model._guess(8, 16) is None
        model._note(8, 16, other, None)
        assert model._guess(8, 16) == other
        # The third miss ends guessing for the shape.
        model._note(8, 16, full, other)
        model._note(8, 16, full, None)
        assert model._streaks[(8, 16)] == (full, 2, 3)
        assert model._guess(8, 16) is None
    finally:
        model._streaks = saved


def test_the_table_of_shapes_is_bounded(base, monkeypatch):
    model = base.compiled
    saved = model._streaks
    model._streaks = {}
    monkeypatch.setattr(runtime, "_STREAKS_MAX", 8)
    try:
        for seq in range(1, 30):
            model._note(1, seq, _full(1, 16), None)
            assert len(model._streaks) <= 8
    finally:
        model._streaks = saved


def test_an_input_table_left_in_flight_is_waited_for(base_eager, monkeypatch):
    """A call that stopped between its input kernel's launch and its wait leaves the table in
    flight: the next fill, and a move to another device (which drops the table), first wait
    for the device it was launched on, once."""
    model, _ = base_eager
    compiled = optimize(model, DiscSettings(precision="fp32"))
    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append(device))
    before = compiled.device
    compiled._wait_for_table()
    assert waits == []
    compiled._table_in_flight = True
    compiled._wait_for_table()
    compiled._wait_for_table()
    assert waits == [before] and compiled._table_in_flight is False
    compiled._table_in_flight = True
    compiled.to(before)
    assert waits == [before, before] and compiled._table_in_flight is False
    assert compiled._table is None and compiled._input_graphs == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphs_run_ahead_and_results_stay_the_calls_own(base_eager, seed, replays):
    model, _ = base_eager
    compiled = optimize(model, DiscSettings(precision="fp32"))
    generator = torch.Generator().manual_seed(seed)

    def call(inputs, expect_replays):
        replays.clear()
        out = compiled(**inputs)
        compare(out, eager(model, inputs), inputs["attention_mask"], True, f"seed {seed}")
        # Replays of the model's own graphs (the GEMM tuner times its candidates in graphs too).
        ours = [g for g in replays if any(g is entry[2] for entry in compiled._graphs.values())]
        assert len(ours) == expect_replays, (len(ours), expect_replays)
        return out

    full = [random_inputs(generator, 8, 32, "none") for _ in range(5)]
    # Calls 1 and 2 of the shape read the statistics first; from call 3 on the graph runs
    # ahead, once per call, on each call's own inputs.
    for i, inputs in enumerate(full):
        call(inputs, 1)
        assert (compiled._guess(8, 32) is not None) == (i >= 1)
    first = compiled(**full[0])
    again = compiled(**full[0])
    for field in first:
        assert torch.equal(first[field], again[field]), field
    # Same shape with padding: the guess is wrong, its run is discarded and the right graph
    # replays in the same call (a capture on the first such call, then a replay).
    # (64 real tokens of 256 positions: 64 rows.)
    padded = random_inputs(generator, 8, 32, "none")
    padded["attention_mask"][:, 8:] = 0
    call(padded, 2)
    assert compiled._streaks[(8, 32)] == (None, 0, 1)
    call(full[1], 1)  # after a key with padding removed, no guess: one replay
    call(full[2], 1)
    call(full[3], 1)  # guessed again
    assert compiled._guess(8, 32) is not None
    # Ids outside the vocabulary: the graph ran ahead on clamped ids, the check refuses.
    bad = dict(full[4])
    bad["input_ids"] = bad["input_ids"].clone()
    bad["input_ids"][1, 3] = 10_000
    with pytest.raises(ValueError, match="outside the vocabulary"):
        compiled(**bad)
    bad["input_ids"][1, 3] = -7
    with pytest.raises(ValueError, match="outside the vocabulary"):
        compiled(**bad)
    bad = dict(full[4])
    bad["token_type_ids"] = bad["token_type_ids"].clone()
    bad["token_type_ids"][0, 0] = 9
    with pytest.raises(ValueError, match="token_type_ids holds 9"):
        compiled(**bad)
    torch.cuda.synchronize()
    call(full[4], 1)
    again = compiled(**full[0])
    for field in first:
        assert torch.equal(first[field], again[field]), field


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_guessed_graph_that_was_evicted_is_not_run(base_eager, seed):
    """With one graph kept, two shapes evict each other's: every call captures, nothing runs
    ahead, and results are right."""
    model, _ = base_eager
    compiled = optimize(model, DiscSettings(precision="fp32", max_cuda_graphs=1))
    generator = torch.Generator().manual_seed(seed)
    for i in range(6):
        shape = (2, 16) if i % 2 else (3, 20)
        inputs = random_inputs(generator, *shape, "none")
        out = compiled(**inputs)
        compare(out, eager(model, inputs), inputs["attention_mask"], True, f"seed {seed}")
        assert len(compiled._graphs) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_the_input_kernels_graph_serves_every_call_of_its_bucket(base_eager, seed, replays):
    """From the second call of a bucket of input buffers and kind of inputs (dtypes, mask and
    segment ids given or not), the input kernel runs as a CUDA graph that reads each call's
    tensors from the pinned table: the results stay each call's own for fresh tensors at new
    addresses, int64, int32 and uint8 ids, bool masks, strided views, every padding style,
    shapes that share a bucket, and after a call that the checks refused."""
    model, _ = base_eager
    compiled = optimize(model, DiscSettings(precision="fp32"))
    generator = torch.Generator().manual_seed(seed)
    kinds_seen = set()
    # (ids dtype, mask dtype, segment ids given); per kind, shapes of one bucket of input
    # buffers (2 x 16) and one of another (3 x 16).
    kinds = [
        (torch.int64, torch.int64, True),
        (torch.int32, torch.int32, False),
        (torch.uint8, torch.bool, True),
        (torch.int64, torch.bool, False),
    ]
    shapes = [(2, 16), (2, 13), (3, 16), (2, 9), (3, 11)]
    i = 0
    for dtype, mask_dtype, with_types in kinds:
        for batch, seq in shapes:
            padding = ("none", "right", "random")[i % 3]
            full = random_inputs(generator, batch, seq, padding)
            inputs = {}
            for name, t in full.items():
                if name == "token_type_ids" and not with_types:
                    continue
                to = mask_dtype if name == "attention_mask" else dtype
                wide = torch.zeros(batch, seq + 3, dtype=to, device=t.device)
                wide[:, 1 : seq + 1] = t
                inputs[name] = wide[:, 1 : seq + 1] if i % 2 else t.to(to)
            want = eager(model, {k: v.long() for k, v in inputs.items()})
            kind = (batch, dtype, mask_dtype, with_types)
            replays.clear()
            out = compiled(**inputs)
            compare(out, want, inputs["attention_mask"], True, f"call {i}, seed {seed}")
            ran = [g for g in replays if any(g is x for x in compiled._input_graphs.values())]
            assert len(ran) == (kind in kinds_seen), f"call {i}: {len(ran)} input graph replays"
            kinds_seen.add(kind)
            if i == 8:
                bad = {k: v.clone() for k, v in inputs.items()}
                bad["input_ids"][0, 0] = 200
                with pytest.raises(ValueError, match="outside the vocabulary"):
                    compiled(**bad)
            i += 1
    assert len(compiled._input_graphs) == len(kinds_seen)
