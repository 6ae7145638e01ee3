"""Soak: mixed shapes for a long time on a GPU (10 minutes by default; set
OPTIMUM_DISC_SOAK_SECONDS to shorten or lengthen it).

No error, no growth of allocated memory after the warm-up (every bucket's graph captured at
least once), and results still exact: a fixed set of probe inputs is run again every minute and
must give, bit for bit, what it gave at the start; every 500th call is compared with eager
(fp32, RTOL).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from optimum_disc import DiscSettings, optimize

from .helpers import MAX_POSITIONS, PADDINGS, compare, eager, random_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

SECONDS = float(os.environ.get("OPTIMUM_DISC_SOAK_SECONDS", "600"))


def _mixed(generator):
    batch = int(torch.randint(1, 10, (), generator=generator))
    seq = int(torch.randint(1, MAX_POSITIONS + 1, (), generator=generator))
    padding = PADDINGS[int(torch.randint(0, len(PADDINGS), (), generator=generator))]
    return random_inputs(generator, batch, seq, padding)


@pytest.mark.parametrize("remove_padding", [True, False])
def test_soak(base_eager, remove_padding, seed):
    model, _ = base_eager
    settings = DiscSettings(precision="fp32", remove_padding=remove_padding)
    compiled = optimize(model, settings)
    generator = torch.Generator().manual_seed(seed)
    probes = [_mixed(generator) for _ in range(16)]
    first = [{k: v.clone() for k, v in compiled(**p).items()} for p in probes]

    # Warm-up: a fifth of the time (at most a minute) of mixed shapes, then the bound.
    started = time.monotonic()
    warm_up = min(60.0, SECONDS / 5)
    calls = 0
    while time.monotonic() - started < warm_up:
        compiled(**_mixed(generator))
        calls += 1
    torch.cuda.synchronize()
    settled = torch.cuda.memory_allocated()
    # Later captures may hold larger buckets than the ones alive now: allow the pool's worth of
    # the largest bucket's inputs and outputs (a few hundred KiB for the tiny model) and slack.
    bound = settled + (16 << 20)
    next_probe = time.monotonic() + 60
    while time.monotonic() - started < SECONDS:
        inputs = _mixed(generator)
        out = compiled(**inputs)
        calls += 1
        if calls % 500 == 0:
            ref = eager(model, inputs)
            compare(out, ref, inputs["attention_mask"], remove_padding, f"call {calls}")
        del out
        allocated = torch.cuda.memory_allocated()
        assert allocated <= bound, f"call {calls}: {allocated} bytes > {bound} (settled {settled})"
        assert len(compiled._graphs) <= settings.max_cuda_graphs
        if time.monotonic() >= next_probe:
            next_probe += 60
            for i, p in enumerate(probes):
                again = compiled(**p)
                for field, value in first[i].items():
                    assert torch.equal(again[field], value), f"probe {i} {field} after {calls}"
    print(
        f"soak: {calls} calls in {time.monotonic() - started:.0f} s, allocated {settled} -> "
        f"{torch.cuda.memory_allocated()} (bound {bound})"
    )
