"""Memory: outputs are fresh tensors; the shape buckets are bounded; on a GPU, the pool of
captured CUDA graphs stays within ``max_cuda_graphs`` (least recently used evicted) and the
allocated memory stays under a bound over 10,000 calls of random shapes."""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict

import pytest
import torch

from optimum_disc import DiscSettings, optimize
from optimum_disc.compiler.runtime import _bucket, _row_bucket

from .helpers import MAX_POSITIONS, PADDINGS, compare, eager, random_inputs
from .test_shapes import bucket_key


def _storages(out) -> set[int]:
    return {v.untyped_storage().data_ptr() for v in out.values()}


@pytest.mark.parametrize("fixture", ["base", "base_padded", "classifier"])
def test_outputs_are_fresh_tensors(fixture, request, seed):
    """An output of one call is never changed by a later call, shares memory with nothing the
    model keeps, and changing it in place changes no later result."""
    tiny = request.getfixturevalue(fixture)
    model = tiny.disc if fixture == "classifier" else tiny.compiled
    weights = model.program.weights
    weight_storages = {w.untyped_storage().data_ptr() for w in weights.values()}
    generator = torch.Generator().manual_seed(seed)
    first = random_inputs(generator, 3, 5, "right")
    second = random_inputs(generator, 3, 5, "right")  # same shape: the same bucket
    out1 = model(**first)
    kept = {k: v.clone() for k, v in out1.items()}
    out2 = model(**second)
    for field, value in kept.items():
        assert torch.equal(out1[field], value), f"{field} of call 1 changed by call 2"
    assert not _storages(out1) & _storages(out2), "two calls return the same memory"
    assert not (_storages(out1) | _storages(out2)) & weight_storages
    for value in out2.values():
        value.add_(1000.0)
    again = model(**first)
    for field, value in kept.items():
        assert torch.equal(again[field], value), f"{field}: changing an output changed a result"
    remove = getattr(tiny, "remove_padding", True)
    compare(again, eager(tiny.eager, first), first["attention_mask"], remove, fixture)


@pytest.mark.parametrize(
    "bucket, floor, steps",
    [
        (lambda n: _bucket(n, 1), 1, 4),
        (lambda n: _bucket(n, 16), 16, 4),
        (lambda n: _bucket(n, 64), 64, 4),
        (_row_bucket, 64, 8),
    ],
    ids=["batch", "length", "floor-64", "rows"],
)
def test_bucket_function_bounds_padding_and_buckets(bucket, floor, steps):
    """At least n and the floor, at most 1/steps padding, monotone, idempotent, and at most
    ``steps`` buckets per power of two: a bounded number of CUDA graphs covers every shape."""
    previous = 0
    for n in range(1, 20_000):
        b = bucket(n)
        assert b >= n and b >= floor, (n, floor, b)
        if n > floor:
            assert (b - n) * steps < n, f"{n} -> {b}: more than 1/{steps} padding"
        assert b >= previous, f"not monotone at {n}"
        assert bucket(b) == b, f"{b} is not its own bucket"
        previous = b
    for octave in range(4, 14):
        low, high = 1 << octave, 1 << (octave + 1)
        values = {bucket(n) for n in range(low + 1, high + 1)}
        assert len(values) <= steps, (octave, sorted(values))


def test_the_keys_of_the_tiny_config_are_few(base):
    """Every (batch <= 9, length <= max positions, real tokens) maps to one of a few keys."""
    keys = set()
    for batch, seq in itertools.product(range(1, 10), range(1, MAX_POSITIONS + 1)):
        for real in range(1, batch * seq + 1):
            for first_valid in (True, False):
                keys.add(bucket_key(base.compiled, batch, seq, real, first_valid))
    b_pads = {k[1] for k in keys}
    s_pads = {k[2] for k in keys}
    assert b_pads == {1, 2, 3, 4, 5, 6, 7, 8, 10}
    assert s_pads == {16, 20, 24, 28, 32}
    assert len(keys) < 400


# -- on a GPU -------------------------------------------------------------------------------


def _random_call(generator, max_batch=9, max_seq=MAX_POSITIONS):
    batch = int(torch.randint(1, max_batch + 1, (), generator=generator))
    seq = int(torch.randint(1, max_seq + 1, (), generator=generator))
    padding = PADDINGS[int(torch.randint(0, len(PADDINGS), (), generator=generator))]
    return random_inputs(generator, batch, seq, padding)


def _expected_key(compiled, inputs) -> tuple:
    mask = inputs["attention_mask"]
    batch, seq = mask.shape
    first_valid = bool(mask[:, 0].min() >= 1)
    return bucket_key(compiled, batch, seq, int(mask.sum()), first_valid)


class _LRU:
    """The expected pool: keys in least-recently-used order, at most ``size`` of them."""

    def __init__(self, size: int):
        self.size, self.keys = size, OrderedDict()

    def use(self, key) -> None:
        self.keys[key] = None
        self.keys.move_to_end(key)
        while len(self.keys) > self.size:
            self.keys.popitem(last=False)


def _footprint(base_eager, settings, inputs) -> int:
    """Bytes that one captured graph of the largest bucket keeps allocated."""
    compiled = optimize(base_eager, settings)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = compiled(**inputs)
    del out
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before


@pytest.mark.gpu
def test_graph_pool_evicts_the_least_recently_used(base_eager, seed):
    model, _ = base_eager
    compiled = optimize(model, DiscSettings(precision="fp32", max_cuda_graphs=3))
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        name: random_inputs(generator, b, s, "none")
        for name, b, s in (("A", 1, 3), ("B", 2, 17), ("C", 5, 21), ("D", 9, 30))
    }
    keys = {name: _expected_key(compiled, x) for name, x in shapes.items()}
    assert len(set(keys.values())) == 4
    for name in "ABCAD":  # D evicts B, the least recently used (A was used again)
        out = compiled(**shapes[name])
        compare(out, eager(model, shapes[name]), shapes[name]["attention_mask"], True, name)
    assert list(compiled._graphs) == [keys["C"], keys["A"], keys["D"]]


@pytest.mark.gpu
def test_memory_over_10000_calls_of_random_shapes(base_eager, seed):
    """memory_allocated stays under: the model's allocation before any call + max_cuda_graphs
    x the footprint of one graph of the largest bucket (measured) + 8 MiB (one call's inputs,
    outputs and the caching allocator's rounding). The pool never holds more than
    max_cuda_graphs graphs and evicts in least-recently-used order. Every 100th call is
    compared with eager."""
    model, _ = base_eager
    settings = DiscSettings(precision="fp32")
    generator = torch.Generator().manual_seed(seed)
    largest = random_inputs(generator, 9, MAX_POSITIONS, "none")
    per_graph = _footprint(model, settings, largest)
    torch.cuda.synchronize()
    compiled = optimize(model, settings)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    bound = baseline + settings.max_cuda_graphs * per_graph + (8 << 20)
    lru = _LRU(settings.max_cuda_graphs)
    peak, started = 0, time.perf_counter()
    for i in range(10_000):
        inputs = _random_call(generator)
        out = compiled(**inputs)
        key = _expected_key(compiled, inputs)
        lru.use(key)
        assert list(compiled._graphs) == list(lru.keys), f"call {i}: pool is not LRU"
        assert len(compiled._graphs) <= settings.max_cuda_graphs
        if i % 100 == 0:
            compare(out, eager(model, inputs), inputs["attention_mask"], True, f"call {i}")
        del out
        allocated = torch.cuda.memory_allocated()
        peak = max(peak, allocated)
        assert allocated <= bound, (
            f"call {i}: {allocated} bytes allocated > bound {bound} (baseline {baseline}, "
            f"{per_graph} per graph)"
        )
    print(
        f"10,000 calls in {time.perf_counter() - started:.1f} s; allocated peak {peak} <= "
        f"bound {bound}; reserved {torch.cuda.memory_reserved()}"
    )
