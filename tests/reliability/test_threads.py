"""Threads: one compiled model called from many threads at once.

Every output of a threaded call must equal, bit for bit, the output of the same inputs run on
one thread: the runtime serialises calls on a lock, and a call's result depends on its inputs
only (same shape bucket, same kernels, same GEMM block shapes, no atomics in the arithmetic),
so any difference means one call saw another's buffers.
"""

from __future__ import annotations

import threading

import pytest
import torch

from .helpers import DEVICE, MAX_POSITIONS, PADDINGS, random_inputs


def _workload(seed: int, count: int, max_batch: int, max_seq: int) -> list[dict]:
    """Random shapes and paddings; on a GPU every other call hands over CPU tensors, as a
    server that tokenizes on the CPU does."""
    generator = torch.Generator().manual_seed(seed)
    work = []
    for i in range(count):
        batch = int(torch.randint(1, max_batch + 1, (), generator=generator))
        seq = int(torch.randint(1, max_seq + 1, (), generator=generator))
        device = "cpu" if i % 2 else DEVICE
        work.append(random_inputs(generator, batch, seq, PADDINGS[i % 4], device=device))
    return work


def _outputs(out) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in out.items()}


def run_threads(compiled, threads: int, calls_per_thread: int, seed: int, max_batch, max_seq):
    work = _workload(seed, threads * calls_per_thread, max_batch, max_seq)
    expected = [_outputs(compiled(**inputs)) for inputs in work]
    results: list = [None] * len(work)
    errors: list = []
    start = threading.Barrier(threads)

    def worker(index: int) -> None:
        try:
            start.wait()
            # Interleaved slices: every thread gets a mix of shapes.
            for i in range(index, len(work), threads):
                results[i] = _outputs(compiled(**work[i]))
        except BaseException as e:  # reported below, with the thread
            errors.append((index, e))

    pool = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=900)
    assert not any(t.is_alive() for t in pool), "a thread hangs"
    assert not errors, f"errors in threads: {errors[:3]}"
    for i, (got, want) in enumerate(zip(results, expected)):
        assert got is not None, f"call {i} returned nothing"
        assert got.keys() == want.keys()
        for field in want:
            shape = tuple(work[i]["input_ids"].shape)
            assert torch.equal(got[field], want[field]), (
                f"call {i} {shape} {field}: differs from the single-threaded result by "
                f"{(got[field] - want[field]).abs().max():.3g} (seed {seed})"
            )
    return len(work)


def test_threads_scaled_down(base, seed):
    """4 threads x 10 calls, shapes up to 3 x 6 (the CPU interpreter is slow)."""
    assert run_threads(base.compiled, 4, 10, seed, max_batch=3, max_seq=6) == 40


def test_threads_disc_model(classifier, seed):
    """The same through DiscModelForSequenceClassification: 4 threads x 3 calls."""
    assert run_threads(classifier.disc, 4, 3, seed, max_batch=3, max_seq=6) == 12


@pytest.mark.gpu
@pytest.mark.parametrize("fixture", ["base", "base_padded"])
def test_threads_gpu(fixture, request, seed):
    """8 threads, 2,000 calls in all, every shape of the tiny config (CUDA graphs on), half of
    them with CPU inputs; each thread copies its outputs to the CPU while others may be
    capturing a graph."""
    tiny = request.getfixturevalue(fixture)
    assert tiny.compiled.device.type == "cuda" and tiny.compiled.settings.cuda_graphs
    assert run_threads(tiny.compiled, 8, 250, seed, max_batch=9, max_seq=MAX_POSITIONS) == 2000
