import math
import os

import pytest
import torch

from optimum_disc.kernels import pointwise as pw
from optimum_disc.kernels.pointwise import (
    OPS,
    TOLERANCES,
    pointwise,
    pointwise_reference,
    pointwise_source,
)

# The CPU interpreter evaluates with numpy, which warns where masked-off lanes or special-value
# inputs meet log2(0) and the like; the results are checked, the warnings are noise.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def c(x):
    return {"const": x}


EXPRS = {
    # GELU as BERT's modelling code spells it out, 0.5 * x * (1 + erf(x / sqrt(2))).
    "gelu_written_out": {
        "inputs": ["full"],
        "steps": [
            ["div", 0, c(math.sqrt(2.0))],
            ["erf", 1],
            ["add", 2, c(1.0)],
            ["mul", 0, 3],
            ["mul", 4, c(0.5)],
        ],
    },
    "silu": {"inputs": ["full"], "steps": [["sigmoid", 0], ["mul", 0, 1]]},
    "bias_tanh": {"inputs": ["full", "col"], "steps": [["add", 0, 1], ["tanh", 2]]},
    "pow_const": {
        "inputs": ["full"],
        "steps": [
            ["pow", 0, c(3.0)],
            ["abs", 0],
            ["pow", 2, c(1.5)],
            ["sub", 1, 3],
            ["pow", 0, c(2.0)],
            ["add", 4, 5],
        ],
    },
    # Every other op, on a domain where each is finite: log, sqrt and rsqrt of |x| + 1, pow with
    # a value exponent on a positive base.
    "all_ops": {
        "inputs": ["col", "full", "full"],
        "steps": [
            ["abs", 1],  # 3
            ["add", 3, c(1.0)],  # 4
            ["log", 4],  # 5
            ["sqrt", 4],  # 6
            ["rsqrt", 4],  # 7
            ["maximum", 1, 2],  # 8
            ["minimum", 1, 0],  # 9
            ["neg", 9],  # 10
            ["relu", 10],  # 11
            ["gelu", 8],  # 12
            ["gelu_tanh", 2],  # 13
            ["exp", 7],  # 14
            ["pow", 6, 7],  # 15
            ["div", 12, 4],  # 16
            ["mul", 5, 13],  # 17
            ["sub", 17, 11],  # 18
            ["add", 18, 16],  # 19
            ["add", 19, 15],  # 20
            ["sub", 20, 14],  # 21
        ],
    },
}

# (expression, rows, hidden) pairs: every expression and every awkward size at least once.
CASES = [
    ("gelu_written_out", 129, 32),
    ("gelu_written_out", 7, 1024),
    ("silu", 33, 384),
    ("bias_tanh", 7, 48),
    ("bias_tanh", 1, 768),
    ("pow_const", 33, 48),
    ("all_ops", 7, 768),
    ("all_ops", 129, 48),
]


def _inputs(expr, M, N, dtype, device):
    return [
        (torch.randn(M, N) * 2 if kind == "full" else torch.randn(N)).to(dtype=dtype, device=device)
        for kind in expr["inputs"]
    ]


def _assert_close(out, ref, dtype, seed):
    assert torch.isfinite(out).all(), f"non-finite output (seed={seed})"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        out.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"seed={seed}: {m}"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}")
def test_pointwise(case, dtype, device, seed):
    name, M, N = case
    expr = EXPRS[name]
    inputs = _inputs(expr, M, N, dtype, device)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=device)
    got = pointwise(expr, inputs, out=out)
    assert got is out
    _assert_close(out, pointwise_reference(expr, inputs), dtype, seed)


def test_pointwise_strided_mixed_dtypes(device, seed):
    """Row-strided full inputs and out, inputs of different dtypes, an fp32 output."""
    expr = {"inputs": ["full", "col", "full"], "steps": [["mul", 0, 1], ["add", 3, 2]]}
    M, N = 7, 48
    a = torch.randn(M, N + 16).to(dtype=torch.float16, device=device)[:, 16:]
    col = torch.randn(N, device=device)
    b = torch.randn(M, 2 * N).to(dtype=torch.bfloat16, device=device)[:, :N]
    buf = torch.full((M, N + 8), float("nan"), device=device)
    out = buf[:, :N]
    pointwise(expr, [a, col, b], out=out)
    _assert_close(out, pointwise_reference(expr, [a, col, b], torch.float32), torch.float32, seed)
    assert torch.isnan(buf[:, N:]).all(), f"wrote outside the out view (seed={seed})"

    got = pointwise(expr, [a, col, b], out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    _assert_close(got, pointwise_reference(expr, [a, col, b], torch.bfloat16), torch.bfloat16, seed)
    # Without out or out_dtype, the first full input's dtype.
    assert pointwise(expr, [a, col, b]).dtype == torch.float16


def test_pointwise_constants_and_col_output(device, seed):
    """An all-constant step, infinite constants and an output that depends on a col only."""
    expr = {
        "inputs": ["full", "col"],
        "steps": [
            ["exp", c(1.0)],  # 2
            ["minimum", 1, c(math.inf)],  # 3
            ["maximum", 3, c(-math.inf)],  # 4
            ["mul", 4, 2],  # 5
            ["pow", c(2.0), 5],  # 6
        ],
    }
    inputs = [torch.randn(5, 48, device=device), torch.randn(48, device=device)]
    got = pointwise(expr, inputs)
    _assert_close(got, pointwise_reference(expr, inputs), torch.float32, seed)
    assert (got == got[0]).all(), f"a col-only result must be the same on every row (seed={seed})"


def test_pointwise_special_values(device):
    """NaN and infinities go through as torch has them."""
    x = torch.tensor([[float("nan"), -2.0, 0.0, float("inf"), -float("inf"), 1.0]], device=device)
    y = torch.tensor([[1.0, 3.0, 0.0, -1.0, 3.0, float("nan")]], device=device)
    for op in ("maximum", "minimum", "pow"):
        expr = {"inputs": ["full", "full"], "steps": [[op, 0, 1]]}
        torch.testing.assert_close(
            pointwise(expr, [x, y]), pointwise_reference(expr, [x, y]), equal_nan=True, msg=op
        )
    expr = {"inputs": ["full"], "steps": [["relu", 0]]}
    torch.testing.assert_close(pointwise(expr, [x]), torch.relu(x), equal_nan=True)


def test_pointwise_source_is_deterministic_and_names_each_op():
    for name, expr in EXPRS.items():
        src = pointwise_source(expr)
        assert src == pointwise_source(expr), name
        for op, *_ in expr["steps"]:
            assert op in src, (name, op)
    # Between them the expressions above exercise every op.
    assert {op for e in EXPRS.values() for op, *_ in e["steps"]} == set(OPS)
    src = pointwise_source(EXPRS["all_ops"])
    steps = [line for line in src.splitlines() if line.lstrip().startswith("v") and " # " in line]
    assert len(steps) == len(EXPRS["all_ops"]["steps"])
    compile(src, "<pointwise>", "exec")


def test_pointwise_compiles_each_source_once(device):
    expr = {"inputs": ["full"], "steps": [["mul", 0, c(3.0)], ["neg", 1]]}
    x = torch.randn(3, 32, device=device)
    pointwise(expr, [x])
    kernel = pw._load_kernel(pointwise_source(expr))
    assert pw._load_kernel(pointwise_source(expr)) is kernel
    files = os.listdir(pw._cache_dir())
    assert any(f.endswith(".py") for f in files)
    assert not any(f.endswith(".tmp") for f in files)


def test_pointwise_no_rows(device):
    expr = EXPRS["bias_tanh"]
    got = pointwise(expr, [torch.empty(0, 48, device=device), torch.randn(48, device=device)])
    assert got.shape == (0, 48)


@pytest.mark.parametrize(
    "expr, match",
    [
        ({"inputs": ["full"], "steps": [["softmax", 0]]}, "softmax"),
        ({"inputs": ["full"], "steps": [["where", 0, 0, 0]]}, "where"),
        ({"inputs": ["full"], "steps": [["exp", 1]]}, "operand 1"),
        ({"inputs": ["full"], "steps": [["exp", -1]]}, "operand -1"),
        ({"inputs": ["full"], "steps": [["add", 0]]}, "2 operand"),
        ({"inputs": ["full"], "steps": [["add", 0, {"konst": 1.0}]]}, "konst"),
        ({"inputs": ["row"], "steps": [["exp", 0]]}, "row"),
        ({"inputs": ["col"], "steps": [["exp", 0]]}, "full"),
        ({"inputs": ["full"], "steps": []}, "steps"),
    ],
)
def test_pointwise_rejects_bad_expressions(expr, match):
    with pytest.raises(ValueError, match=match):
        pointwise_source(expr)


def test_pointwise_rejects_bad_inputs(device):
    expr = EXPRS["bias_tanh"]
    x, col = torch.randn(4, 32, device=device), torch.randn(32, device=device)
    with pytest.raises(ValueError, match="2 inputs"):
        pointwise(expr, [x])
    with pytest.raises(ValueError, match="col input 1"):
        pointwise(expr, [x, torch.randn(16, device=device)])
    with pytest.raises(ValueError, match="column stride"):
        pointwise(expr, [torch.randn(32, 4, device=device).t(), col])
    with pytest.raises(ValueError, match="int64"):
        pointwise(expr, [x.long(), col])
    with pytest.raises(ValueError, match="out"):
        pointwise(expr, [x, col], out=torch.empty(4, 16, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(EXPRS))
@pytest.mark.parametrize("shape", [(16384, 3072), (4097, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pointwise_large(shape, name, dtype, device, seed):
    expr = EXPRS[name]
    inputs = _inputs(expr, *shape, dtype, device)
    _assert_close(pointwise(expr, inputs), pointwise_reference(expr, inputs), dtype, seed)
