import pytest
import torch

from optimum_disc.kernels.embedding import (
    TOLERANCES,
    embed_layernorm,
    embed_layernorm_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (batch, seq, hidden, ids dtype, rows, token type, position offset): each feature is covered at
# least once across the cases without taking their product. rows: "all" or "subset" (a random
# subset of the B*S tokens in random order); token type: "ids" (an id tensor of the other int
# dtype), "default" (a table but no ids: type 0) or "none" (no table).
CASES = [
    (1, 7, 768, torch.int64, "all", "ids", 0),
    (3, 11, 48, torch.int32, "subset", "default", 2),
    (2, 17, 384, torch.int64, "subset", "none", 2),
    (3, 43, 32, torch.int32, "all", "ids", 2),
    (1, 7, 1024, torch.int32, "subset", "ids", 0),
]


def _case_id(case):
    B, S, H, ids_dtype, rows, tt, offset = case
    return f"{B}x{S}x{H}-{str(ids_dtype)[6:]}-rows_{rows}-tt_{tt}-off{offset}"


def _inputs(B, S, H, dtype, ids_dtype, rows, tt, offset, device, vocab=97):
    input_ids = torch.randint(0, vocab, (B, S), dtype=ids_dtype).to(device)
    word = torch.randn(vocab, H).to(dtype=dtype, device=device)
    # A few positions to spare, as real tables have, so that a wrong offset reads real rows.
    position = torch.randn(S + offset + 5, H).to(dtype=dtype, device=device)
    kwargs = {"position_offset": offset}
    if tt != "none":
        kwargs["token_type"] = torch.randn(2, H).to(dtype=dtype, device=device)
    if tt == "ids":
        other = torch.int64 if ids_dtype == torch.int32 else torch.int32
        kwargs["token_type_ids"] = torch.randint(0, 2, (B, S), dtype=other).to(device)
    if rows == "subset":
        n = max(1, (2 * B * S) // 3)
        kwargs["rows"] = torch.randperm(B * S)[:n].to(dtype=ids_dtype, device=device)
    ln_weight = (torch.randn(H) * 0.5 + 1).to(device)
    ln_bias = torch.randn(H).to(dtype=dtype, device=device)
    return (input_ids, word, position, ln_weight, ln_bias), kwargs


def _assert_close(out, ref, dtype, seed):
    assert torch.isfinite(out).all(), f"non-finite output (seed={seed})"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        out.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"seed={seed}: {m}"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_embed_layernorm(case, dtype, device, seed):
    B, S, H, ids_dtype, rows, tt, offset = case
    args, kwargs = _inputs(B, S, H, dtype, ids_dtype, rows, tt, offset, device)
    R = kwargs["rows"].shape[0] if "rows" in kwargs else B * S
    out = torch.full((R, H), float("nan"), dtype=dtype, device=device)
    got = embed_layernorm(*args, 1e-12, out=out, **kwargs)
    assert got is out
    ref = embed_layernorm_reference(*args, 1e-12, **kwargs)
    assert ref.shape == (R, H)
    _assert_close(out, ref, dtype, seed)


def test_embed_layernorm_rows_pick_tokens(device, seed):
    """Output row i is the token at flat index rows[i]: the subset equals the full output's rows."""
    args, kwargs = _inputs(2, 9, 48, torch.float32, torch.int64, "all", "ids", 2, device)
    full = embed_layernorm(*args, 1e-5, **kwargs)
    rows = torch.randperm(18)[:7].to(device)
    picked = embed_layernorm(*args, 1e-5, rows=rows, **kwargs)
    torch.testing.assert_close(picked, full[rows], msg=lambda m: f"seed={seed}: {m}")


def test_embed_layernorm_out_dtype_and_strided_out(device, seed):
    args, kwargs = _inputs(2, 7, 48, torch.float32, torch.int32, "subset", "ids", 0, device)
    R = kwargs["rows"].shape[0]
    got = embed_layernorm(*args, 1e-5, out_dtype=torch.bfloat16, **kwargs)
    assert got.dtype == torch.bfloat16 and got.shape == (R, 48)
    ref = embed_layernorm_reference(*args, 1e-5, out_dtype=torch.bfloat16, **kwargs)
    assert ref.dtype == torch.bfloat16
    _assert_close(got, ref, torch.bfloat16, seed)

    buf = torch.full((R, 64), float("nan"), dtype=torch.bfloat16, device=device)
    out = buf[:, 16:]
    embed_layernorm(*args, 1e-5, out=out, **kwargs)
    _assert_close(out, ref, torch.bfloat16, seed)
    assert torch.isnan(buf[:, :16]).all(), f"wrote outside the out view (seed={seed})"


def test_embed_layernorm_no_tokens(device):
    args, kwargs = _inputs(2, 5, 32, torch.float32, torch.int64, "all", "none", 0, device)
    rows = torch.empty(0, dtype=torch.int64, device=device)
    assert embed_layernorm(*args, 1e-5, rows=rows, **kwargs).shape == (0, 32)


def test_embed_layernorm_rejects_bad_arguments(device):
    args, kwargs = _inputs(2, 5, 32, torch.float32, torch.int64, "all", "ids", 0, device)
    ids, word, position, w, b = args
    with pytest.raises(ValueError, match="float32"):
        embed_layernorm(ids.float(), word, position, w, b, 1e-5)
    with pytest.raises(ValueError, match="position"):
        embed_layernorm(ids, word, position[:4], w, b, 1e-5)
    with pytest.raises(ValueError, match="position_offset"):
        embed_layernorm(ids, word, position, w, b, 1e-5, position_offset=100)
    with pytest.raises(ValueError, match="token_type_ids"):
        embed_layernorm(ids, word, position, w, b, 1e-5, **{**kwargs, "token_type_ids": ids[:1]})
    with pytest.raises(ValueError, match="token_type"):
        embed_layernorm(ids, word, position, w, b, 1e-5, token_type_ids=ids)
    with pytest.raises(ValueError, match="ln_weight"):
        embed_layernorm(ids, word, position, w[:16], b, 1e-5)
    with pytest.raises(ValueError, match="rows"):
        embed_layernorm(ids, word, position, w, b, 1e-5, rows=ids)
    with pytest.raises(ValueError, match="out"):
        embed_layernorm(ids, word, position, w, b, 1e-5, out=torch.empty(3, 32, device=device))
    with pytest.raises(ValueError, match="out_dtype"):
        out = torch.empty(10, 32, device=device)
        embed_layernorm(ids, word, position, w, b, 1e-5, out=out, out_dtype=torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ["all", "subset"])
def test_embed_layernorm_large(rows, dtype, device, seed):
    args, kwargs = _inputs(32, 512, 1024, dtype, torch.int64, rows, "ids", 2, device, vocab=30522)
    got = embed_layernorm(*args, 1e-12, **kwargs)
    ref = embed_layernorm_reference(*args, 1e-12, **kwargs)
    _assert_close(got, ref, dtype, seed)
