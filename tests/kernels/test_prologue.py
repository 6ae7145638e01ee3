"""The input-preparation kernel against its PyTorch reference: padded copies and statistics."""

import pytest
import torch

from optimum_disc.kernels.prologue import (
    InputBuffers,
    InputTable,
    derive_rows,
    derive_rows_reference,
    prepare_inputs,
    prepare_inputs_reference,
)


@pytest.mark.parametrize(
    "batch,seq,b_pad,s_pad",
    [(1, 1, 1, 1), (2, 3, 4, 16), (5, 9, 8, 16), (33, 7, 40, 8), (3, 129, 4, 144)],
)
@pytest.mark.parametrize("with_mask,with_types", [(True, True), (False, False), (True, False)])
def test_prepare_inputs_matches_reference(
    batch, seq, b_pad, s_pad, with_mask, with_types, device, seed
):
    ids = torch.randint(-5, 100, (batch, seq), device=device)
    mask = torch.randint(0, 3, (batch, seq), device=device) if with_mask else None
    types = torch.randint(-1, 3, (batch, seq), device=device) if with_types else None
    buffers = InputBuffers(b_pad, s_pad, device)
    # Stale values from an earlier, larger call must not survive past B and S.
    for t in (buffers.ids, buffers.mask, buffers.types):
        t.fill_(7)
    for _ in range(2):  # the ticket must be left at zero for the next launch
        stats = prepare_inputs(ids, mask, types, buffers)
        ref_ids, ref_mask, ref_types, ref_stats = prepare_inputs_reference(
            ids, mask, types, b_pad, s_pad
        )
        assert stats.tolist() == ref_stats.tolist(), f"seed {seed}"
        assert torch.equal(buffers.ids, ref_ids), f"seed {seed}"
        assert torch.equal(buffers.mask, ref_mask), f"seed {seed}"
        assert torch.equal(buffers.types, ref_types), f"seed {seed}"
        assert buffers.ticket.item() == 0


@pytest.mark.parametrize("id_limit,type_limit", [(50, 2), (1, 1), (100, None)])
def test_buffers_hold_clamped_ids_and_statistics_the_raw_ones(id_limit, type_limit, device, seed):
    """Ids outside the tables reach the buffers clamped (kernels that read them before the
    runtime's check never index past a table) while the statistics report the caller's values,
    which the runtime refuses."""
    ids = torch.randint(-20, 120, (6, 11), device=device)
    types = torch.randint(-3, 5, (6, 11), device=device)
    mask = torch.randint(0, 2, (6, 11), device=device)
    buffers = InputBuffers(8, 16, device)
    stats = prepare_inputs(ids, mask, types, buffers, None, id_limit, type_limit)
    ref = prepare_inputs_reference(ids, mask, types, 8, 16, None, id_limit, type_limit)
    assert torch.equal(buffers.ids, ref[0]) and torch.equal(buffers.types, ref[2]), f"seed {seed}"
    assert int(buffers.ids.min()) >= 0 and int(buffers.ids.max()) <= id_limit - 1
    assert stats.tolist() == ref[3].tolist(), f"seed {seed}"
    assert stats[0].item() == int(ids.min()) and stats[1].item() == int(ids.max())
    # Without limits, after a launch with them (on a GPU the second launch reuses the compiled
    # kernel, whose limit arguments were typed by the first values): only negatives clamped.
    stats = prepare_inputs(ids, mask, types, buffers)
    ref = prepare_inputs_reference(ids, mask, types, 8, 16)
    assert torch.equal(buffers.ids, ref[0]) and torch.equal(buffers.types, ref[2]), f"seed {seed}"
    assert stats.tolist() == ref[3].tolist(), f"seed {seed}"
    with pytest.raises(ValueError, match="id_limit=0"):
        prepare_inputs(ids, mask, types, buffers, None, 0, type_limit)


def test_statistics_into_a_host_buffer(device, seed):
    """``stats_out``: the statistics land there (on a GPU, pinned host memory the kernel writes
    directly, read after an event behind the launch), the buffers' own are left alone, and
    every call overwrites all eight."""
    on_gpu = device != "cpu"
    host = torch.full((8,), -99, dtype=torch.int64, pin_memory=on_gpu)
    buffers = InputBuffers(8, 16, device)
    buffers.stats.fill_(-7)
    for batch, seq in ((3, 9), (8, 16), (1, 1)):
        ids = torch.randint(-5, 100, (batch, seq), device=device)
        mask = torch.randint(0, 2, (batch, seq), device=device)
        types = torch.randint(0, 2, (batch, seq), device=device)
        got = prepare_inputs(ids, mask, types, buffers, None, 60, 2, stats_out=host)
        assert got is host
        if on_gpu:
            done = torch.cuda.Event()
            done.record()
            done.synchronize()
        ref = prepare_inputs_reference(ids, mask, types, 8, 16, None, 60, 2)
        assert host.tolist() == ref[3].tolist(), f"[{batch}, {seq}], seed {seed}"
        assert torch.equal(buffers.ids, ref[0]), f"[{batch}, {seq}], seed {seed}"
        assert buffers.stats.tolist() == [-7] * 8
    with pytest.raises(ValueError, match="stats_out is torch.int32 with 8 elements"):
        prepare_inputs(ids, mask, types, buffers, stats_out=host.int())


def test_strided_inputs(device, seed):
    wide = torch.randint(0, 50, (4, 20), device=device)
    ids = wide[:, ::2]
    buffers = InputBuffers(4, 16, device)
    stats = prepare_inputs(ids, None, None, buffers)
    ref = prepare_inputs_reference(ids, None, None, 4, 16)
    assert torch.equal(buffers.ids, ref[0]) and stats.tolist() == ref[3].tolist()


def test_one_compiled_kernel_serves_every_size_stride_and_address(device, seed):
    """From its second launch on a GPU the input kernel runs from its compiled form, given each
    call's own sizes, strides and addresses: right for every call of a run that changes them
    (unaligned starts and row strides included)."""
    from optimum_disc.kernels import prologue

    g = torch.Generator().manual_seed(seed)
    buffers = InputBuffers(8, 32, device)
    for i in range(12):
        batch = int(torch.randint(1, 9, (), generator=g))
        seq = int(torch.randint(1, 33, (), generator=g))
        offset = i % 3  # an odd offset makes the start of the int64 rows unaligned to 16 bytes
        wide = torch.randint(-3, 60, (batch, seq + 5), generator=g).to(device)
        ids = wide[:, offset : offset + seq]
        mask = (torch.rand(batch, seq + 1, generator=g) > 0.3).long().to(device)[:, 1:]
        types = torch.randint(0, 2, (batch, seq), generator=g).to(device) if i % 2 else None
        stats = prepare_inputs(ids, mask, types, buffers)
        ref = prepare_inputs_reference(ids, mask, types, 8, 32)
        got = (buffers.ids, buffers.mask, buffers.types)
        for name, a, b in zip(("ids", "mask", "types"), got, ref[:3]):
            assert torch.equal(a, b), f"call {i} [{batch}, {seq}] +{offset}: {name}, seed {seed}"
        assert stats.tolist() == ref[3].tolist(), f"call {i}: statistics, seed {seed}"
    if device == "cuda":
        assert prologue._COMPILED, "the input kernel was never launched from its compiled form"


def _table_calls(g, device, n):
    """``n`` calls of changing shapes, dtypes, strides and offsets, with and without a mask or
    segment ids (fresh tensors each, so at fresh addresses)."""
    for i in range(n):
        batch = int(torch.randint(1, 9, (), generator=g))
        seq = int(torch.randint(1, 33, (), generator=g))
        dtype = (torch.int64, torch.int32, torch.uint8)[i % 3]
        offset = i % 3
        low = 0 if dtype == torch.uint8 else -3
        wide = torch.randint(low, 60, (batch, seq + 5), generator=g).to(device, dtype)
        ids = wide[:, offset : offset + seq]
        mask_dtype = torch.bool if i % 5 == 1 else dtype
        mask = (torch.rand(batch, seq + 1, generator=g) > 0.3).to(device, mask_dtype)[:, 1:]
        types = torch.randint(0, 2, (batch, seq), generator=g).to(device, dtype)
        yield i, ids, (mask if i % 3 else None), (types if i % 4 else None)


def test_table_launch_reads_the_inputs_from_the_table(device, seed, monkeypatch):
    """``table=``: the kernel takes the caller's tensors, shape and strides from the table, and
    computes what the plain launch computes, for every kind of input. Then as a graph replay
    would: the table holds one call's inputs while the launch is given stand-ins of the same
    kind (dtypes, arguments left out), which only type the kernel."""
    g = torch.Generator().manual_seed(seed)
    table = InputTable(pin=device != "cpu")
    buffers = InputBuffers(8, 32, device)
    for i, ids, mask, types in _table_calls(g, device, 12):
        ref = prepare_inputs_reference(ids, mask, types, 8, 32, 3, 50, 2)
        stats = prepare_inputs(ids, mask, types, buffers, 3, 50, 2, table=table).clone()
        assert table.tensor[3:5].tolist() == list(ids.shape)
        table.fill(ids, mask, types)
        stand_in = [None if t is None else torch.zeros_like(t[:1, :1]) for t in (ids, mask, types)]
        with monkeypatch.context() as m:
            m.setattr(table, "fill", lambda *args: None)
            replayed = prepare_inputs(*stand_in, buffers, 3, 50, 2, table=table).clone()
        for what, got in (("launch", stats), ("stand-ins", replayed)):
            assert got.tolist() == ref[3].tolist(), f"call {i} {what}: statistics, seed {seed}"
        got = (buffers.ids, buffers.mask, buffers.types)
        for name, a, b in zip(("ids", "mask", "types"), got, ref[:3]):
            assert torch.equal(a, b), f"call {i} {tuple(ids.shape)}: {name}, seed {seed}"
    with pytest.raises(TypeError, match="pass an InputTable"):
        prepare_inputs(ids, mask, types, buffers, table=table.tensor)


@pytest.mark.gpu
def test_graph_of_a_table_launch_serves_new_inputs(seed):
    """A CUDA graph captured around one table launch, replayed after the table is filled with
    other inputs (other shapes of the bucket, addresses and strides), computes on those."""
    g = torch.Generator().manual_seed(seed)
    table = InputTable(pin=True)
    buffers = InputBuffers(8, 32, "cuda")
    stats = torch.zeros(8, dtype=torch.int64, pin_memory=True)
    kinds = {}
    for i, ids, mask, types in _table_calls(g, "cuda", 24):
        kind = (ids.dtype, None if mask is None else mask.dtype, types is None)
        if kind not in kinds:  # one graph per dtype and arguments given, as the runtime keeps
            prepare_inputs(ids, mask, types, buffers, 3, 50, 2, stats_out=stats, table=table)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                prepare_inputs(ids, mask, types, buffers, 3, 50, 2, stats_out=stats, table=table)
            kinds[kind] = graph
        stats.fill_(-1)
        table.fill(ids, mask, types)
        kinds[kind].replay()
        torch.cuda.synchronize()
        ref = prepare_inputs_reference(ids, mask, types, 8, 32, 3, 50, 2)
        got = (buffers.ids, buffers.mask, buffers.types)
        for name, a, b in zip(("ids", "mask", "types"), got, ref[:3]):
            assert torch.equal(a, b), f"call {i} {tuple(ids.shape)}: {name}, seed {seed}"
        assert stats.tolist() == ref[3].tolist(), f"call {i}: statistics, seed {seed}"
    assert len(kinds) > 1
    with pytest.raises(ValueError, match="pin=True"):
        prepare_inputs(ids, mask, types, buffers, table=InputTable())


@pytest.mark.parametrize("with_mask", [True, False])
def test_counts_real_tokens_after_a_padding_token(with_mask, device, seed):
    """RoBERTa-style positions: the eighth statistic counts real tokens at or after a padding
    token of their own sequence (left padding, padding inside), never across sequences."""
    pad = 1
    ids = torch.randint(2, 50, (6, 11), device=device)
    mask = torch.ones_like(ids)
    ids[0, 8:], mask[0, 8:] = pad, 0  # right padding: fine
    ids[1, :3], mask[1, :3] = pad, 0  # left padding: 8 real tokens after it
    ids[2, 4] = pad  # a real padding token inside: it and the 6 after it
    ids[3, 10] = pad  # the last token, real: 1
    ids[5, 0] = pad  # ...and a masked one at the start of another sequence
    mask[5, 0] = 0
    for _ in range(2):
        stats = prepare_inputs(
            ids, mask if with_mask else None, None, InputBuffers(8, 16, device), pad_token_id=pad
        )
        ref = prepare_inputs_reference(ids, mask if with_mask else None, None, 8, 16, pad)[3]
        assert stats.tolist() == ref.tolist(), f"seed {seed}"
    expected = (8 + 7 + 1 + 10) if with_mask else (3 + 11 + 7 + 1 + 11)
    assert stats[7].item() == expected
    assert prepare_inputs(ids, mask, None, InputBuffers(8, 16, device))[7].item() == 0


def test_refuses_inputs_larger_than_the_buffers(device):
    with pytest.raises(ValueError, match="do not fit"):
        prepare_inputs(
            torch.zeros(3, 5, dtype=torch.long, device=device),
            None,
            None,
            InputBuffers(2, 8, device),
        )


@pytest.mark.parametrize(
    "b, s, rows, p_real",
    [
        (1, 1, 1, 1.0),
        (2, 16, 32, 1.0),  # no padding
        (3, 9, 27, 0.0),  # no real token
        (4, 16, 40, 0.6),  # rows cut inside the padding
        (5, 33, 64, 0.5),  # rows cut inside the real tokens
        (17, 160, 17 * 160, 0.7),  # several blocks of the kernel's loop
    ],
)
def test_derive_rows_matches_reference(b, s, rows, p_real, device, seed):
    mask = (torch.rand(b, s, device=device) < p_real).long()
    mask[:, s - s // 4 :] = 0  # padding on the right, as in a bucket
    if b > 1:
        mask[b - 1] = 0  # a bucket's padded sequence
    got_rows = torch.full((rows,), -1, dtype=torch.long, device=device)
    got_cu = torch.full((b + 1,), -1, dtype=torch.int32, device=device)
    got_first = torch.full((b,), -1, dtype=torch.long, device=device)
    derive_rows(mask, got_rows, got_cu, got_first)
    want_rows, want_cu, want_first = derive_rows_reference(mask, rows)
    msg = f"b={b} s={s} rows={rows} seed={seed}"
    assert torch.equal(got_rows, want_rows), msg
    assert torch.equal(got_cu, want_cu), msg
    assert torch.equal(got_first, want_first), msg


def test_derive_rows_refuses_buffers_of_another_shape(device):
    mask = torch.ones(2, 4, dtype=torch.long, device=device)
    rows = torch.empty(8, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="do not fit a \\[2, 4\\] mask"):
        derive_rows(mask, rows, torch.empty(2, dtype=torch.int32, device=device), rows[:2])
