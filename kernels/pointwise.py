"""Generated Triton kernels for chains of elementwise ops left over after the other fusions.

An expression is plain data (it is saved in compiled artifacts): ``inputs`` lists one kind per
tensor input, ``"full"`` for an [M, N] tensor or ``"col"`` for an [N] vector broadcast over the
rows; ``steps`` are SSA ops, each appending one value after the inputs; the last step's value is
the [M, N] output. An operand is the index of an earlier value or ``{"const": float}``.

    >>> import torch
    >>> from optimum_disc.kernels.pointwise import pointwise
    >>> expr = {"inputs": ["full", "col"], "steps": [["add", 0, 1], ["gelu", 2]]}
    >>> pointwise(expr, [torch.randn(4, 48), torch.randn(48)]).shape
    torch.Size([4, 48])
"""

import hashlib
import importlib.util
import math
import os
import sys
import tempfile
import threading

import torch
import triton
import triton.language as tl

from optimum_disc.kernels import launch as _launch

# Kernel and reference read the same inputs and compute in fp32, rounding once to the output
# dtype; they differ by the GPU's approximate transcendentals (exp2/log2/rsqrt/division are a
# few ulp) compounded over a chain of steps, plus at most one rounding step of the output dtype
# (2^-10 relative for fp16, 2^-7 for bf16).
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

INPUT_KINDS = ("full", "col")

# Number of operands of each op.
OPS = {
    "add": 2,
    "sub": 2,
    "mul": 2,
    "div": 2,
    "maximum": 2,
    "minimum": 2,
    "pow": 2,
    "neg": 1,
    "exp": 1,
    "log": 1,
    "sqrt": 1,
    "rsqrt": 1,
    "tanh": 1,
    "erf": 1,
    "sigmoid": 1,
    "relu": 1,
    "gelu": 1,
    "gelu_tanh": 1,
    "abs": 1,
}


@triton.jit
def _tanh(x):
    # libdevice's tanh does not run on the CPU interpreter, and 1 - 2 / (exp(2x) + 1) loses all
    # relative precision near 0: Cephes' tanhf polynomial below 0.625, that form above it.
    a = tl.abs(x)
    z = x * x
    p = -5.70498872745e-3 * z + 2.06390887954e-2
    p = p * z - 5.37397155531e-2
    p = p * z + 1.33314422036e-1
    p = p * z - 3.33332819422e-1
    small = p * z * x + x
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    big = tl.where(x < 0, -big, big)
    return tl.where(a < 0.625, small, big)


@triton.jit
def _pow(a, b):
    # exp2(b * log2|a|) with the sign and special cases of torch.pow, since libdevice's pow does
    # not run on the CPU interpreter: negative bases give NaN unless b is an integer, and an odd
    # integer b keeps the sign; b == 0 and a == 1 give 1 even against 0, inf and NaN.
    mag = tl.exp2(b * tl.log2(tl.abs(a)))
    b_int = tl.floor(b) == b
    half = b * 0.5
    b_odd = b_int & (tl.floor(half) != half)
    neg = a < 0
    res = tl.where(neg & b_odd, -mag, mag)
    # NaN made in the kernel: a NaN global constexpr never compares equal to itself, which
    # Triton's compiled mode takes for a changed global and refuses.
    res = tl.where(neg & (b_int == 0), tl.sqrt(tl.abs(res) * 0.0 - 1.0), res)
    return tl.where((b == 0) | (a == 1.0), 1.0, res)


@triton.jit
def _gelu_tanh(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + _tanh(inner))


def _check_expr(expr) -> None:
    if not isinstance(expr, dict) or "inputs" not in expr or "steps" not in expr:
        raise ValueError(f"expr must be a dict with 'inputs' and 'steps', got {expr!r}")
    inputs, steps = expr["inputs"], expr["steps"]
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise ValueError(f"expr['inputs'] must be a non-empty list of 'full'/'col', got {inputs!r}")
    for i, kind in enumerate(inputs):
        if kind not in INPUT_KINDS:
            raise ValueError(f"expr input {i} has kind {kind!r}; use 'full' or 'col'")
    if "full" not in inputs:
        raise ValueError("expr has no 'full' input; the [M, N] output needs one to set M")
    if not isinstance(steps, (list, tuple)) or not steps:
        raise ValueError(f"expr['steps'] must be a non-empty list, got {steps!r}")
    for n, step in enumerate(steps):
        if not isinstance(step, (list, tuple)) or not step:
            raise ValueError(f"step {n} is {step!r}; write it as [op, operand, ...]")
        op, args = step[0], step[1:]
        if op not in OPS:
            raise ValueError(f"step {n} has unknown op {op!r}; known ops: {', '.join(OPS)}")
        if len(args) != OPS[op]:
            raise ValueError(f"step {n}: {op!r} takes {OPS[op]} operand(s), got {len(args)}")
        defined = len(inputs) + n
        for arg in args:
            if isinstance(arg, dict):
                c = arg.get("const")
                if set(arg) != {"const"} or isinstance(c, bool) or not isinstance(c, (int, float)):
                    raise ValueError(
                        f"step {n} has operand {arg!r}; write a constant as {{'const': 0.5}}"
                    )
            elif isinstance(arg, bool) or not isinstance(arg, int) or not 0 <= arg < defined:
                raise ValueError(
                    f"step {n} has operand {arg!r}; use the index of an earlier value "
                    f"(0 to {defined - 1}) or {{'const': x}}"
                )


def _const_source(c: float) -> str:
    c = float(c)
    if math.isnan(c):
        return "NAN"
    # Past fp32's range the reference's fp32 constant is infinite, while Triton would make the
    # literal an fp64 scalar.
    if math.isinf(torch.tensor(c, dtype=torch.float32).item()):
        return "INF" if c > 0 else "(-INF)"
    return repr(c) if c >= 0 else f"({c!r})"


def _step_source(op: str, a: list[str], consts: list) -> str:
    if op in ("add", "sub", "mul", "div"):
        sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[op]
        return f"{a[0]} {sym} {a[1]}"
    if op in ("maximum", "minimum"):
        return f"tl.{op}({a[0]}, {a[1]}, propagate_nan=tl.PropagateNan.ALL)"
    if op == "pow":
        # Exponents that a multiply or a root computes exactly (and for any sign of the base).
        special = {
            1.0: "{0}",
            2.0: "{0} * {0}",
            3.0: "{0} * {0} * {0}",
            0.5: "tl.sqrt({0})",
            -0.5: "tl.rsqrt({0})",
            -1.0: "1.0 / {0}",
        }
        if consts[1] is not None and float(consts[1]) in special:
            return special[float(consts[1])].format(a[0])
        return f"_pow({a[0]}, {a[1]})"
    if op == "neg":
        return f"-{a[0]}"
    if op in ("exp", "log", "sqrt", "rsqrt", "erf", "sigmoid", "abs"):
        return f"tl.{op}({a[0]})"
    if op == "tanh":
        return f"_tanh({a[0]})"
    if op == "relu":
        # where(x < 0) rather than maximum(x, 0): torch.relu keeps NaN.
        return f"tl.where({a[0]} < 0, 0.0, {a[0]})"
    if op == "gelu":
        return f"0.5 * {a[0]} * (1.0 + tl.erf({a[0]} * 0.7071067811865476))"
    if op == "gelu_tanh":
        return f"_gelu_tanh({a[0]})"
    raise AssertionError(op)  # unreachable once _check_expr has passed


def pointwise_source(expr: dict) -> str:
    """The Triton source of the kernel for ``expr``, the same text for the same expression.

    >>> print(pointwise_source({"inputs": ["full"], "steps": [["exp", 0]]}).splitlines()[0])
    # Generated by optimum_disc.kernels.pointwise from a pointwise expression; do not edit.
    """
    _check_expr(expr)
    inputs, steps = expr["inputs"], expr["steps"]
    params = ["out_ptr"] + [f"in{i}_ptr" for i in range(len(inputs))]
    strides = ["stride_out"] + [f"stride_in{i}" for i, k in enumerate(inputs) if k == "full"]
    body = [
        "rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)",
        "cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)",
        "col_mask = (cols < N)[None, :]",
        "mask = (rows < M)[:, None] & col_mask",
        "# int64 so that row * stride cannot wrap for tensors past 2^31 elements.",
        "rows = rows.to(tl.int64)[:, None]",
        "cols = cols[None, :]",
    ]
    for i, kind in enumerate(inputs):
        if kind == "full":
            ptr, m = f"in{i}_ptr + rows * stride_in{i} + cols", "mask"
        else:
            ptr, m = f"in{i}_ptr + cols", "col_mask"
        body.append(f"v{i} = tl.load({ptr}, mask={m}, other=0.0).to(tl.float32)")

    specials, helpers, needs_zero = set(), set(), False
    n_in = len(inputs)
    for n, step in enumerate(steps):
        op, args = step[0], step[1:]
        consts = [a["const"] if isinstance(a, dict) else None for a in args]
        operands = [f"v{a}" if c is None else _const_source(c) for a, c in zip(args, consts)]
        specials.update(t for t in operands if t in ("INF", "(-INF)", "NAN"))
        comment = f"{op}({', '.join(operands)})"
        line = _step_source(op, operands, consts)
        # Tensor-valued constants where a scalar would not do: ops like tl.exp on an all-constant
        # step, and _pow, whose masks need tensors on both sides.
        wrap = [i for i, c in enumerate(consts) if c is not None]
        if "_pow(" not in line:
            wrap = wrap[:1] if len(wrap) == len(consts) else []
        if wrap:
            needs_zero = True
            operands = [f"(zero + {t})" if i in wrap else t for i, t in enumerate(operands)]
            line = _step_source(op, operands, consts)
        helpers.update(h for h in ("_pow", "_tanh", "_gelu_tanh") if f"{h}(" in line)
        body.append(f"v{n_in + n} = {line}  # {comment}")
    if "NAN" in specials:
        # Made in the kernel: a NaN global never equals itself, which compiled Triton takes for
        # a changed global and refuses.
        body.insert(
            len(body) - len(steps), "NAN = tl.sqrt(tl.full((BLOCK_M, BLOCK_N), -1.0, tl.float32))"
        )
    if needs_zero:
        body.insert(len(body) - len(steps), "zero = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)")
    result = f"v{n_in + len(steps) - 1}"
    body += [
        f"out = tl.broadcast_to({result}, (BLOCK_M, BLOCK_N)).to(out_ptr.dtype.element_ty)",
        "tl.store(out_ptr + rows * stride_out + cols, out, mask=mask)",
    ]

    lines = [
        "# Generated by optimum_disc.kernels.pointwise from a pointwise expression; do not edit.",
        "import triton",
        "import triton.language as tl",
    ]
    if helpers:
        lines += ["", f"from optimum_disc.kernels.pointwise import {', '.join(sorted(helpers))}"]
    if specials:
        lines.append("")
    if specials & {"INF", "(-INF)"}:
        lines.append('INF = tl.constexpr(float("inf"))')
    signature = ", ".join(params + ["M", "N"] + strides)
    lines += [
        "",
        "",
        "@triton.jit",
        "def pointwise_kernel(",
        f"    {signature},",
        "    BLOCK_M: tl.constexpr,",
        "    BLOCK_N: tl.constexpr,",
        "):",
    ]
    lines += [f"    {line}" for line in body]
    return "\n".join(lines) + "\n"


_KERNELS: dict = {}
_LOCK = threading.Lock()


def _cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "optimum_disc_pointwise")


def _load_kernel(source: str):
    """The jitted kernel of ``source``, compiled once per process."""
    key = hashlib.sha256(source.encode()).hexdigest()[:24]
    kernel = _KERNELS.get(key)
    if kernel is not None:
        return kernel
    with _LOCK:
        kernel = _KERNELS.get(key)
        if kernel is not None:
            return kernel
        # Triton's jit reads the kernel's source back through inspect, so it must live in a file.
        directory = _cache_dir()
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{key}.py")
        existing = None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                existing = f.read()
        if existing != source:
            # Written beside then renamed, so that a concurrent process never imports half a file.
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(source)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        name = f"optimum_disc_pointwise_{key}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        kernel = module.pointwise_kernel
        _KERNELS[key] = kernel
        return kernel


def _launch_config(M: int, N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for tiles of about 4096 elements."""
    # At least 16 columns so that narrow rows still make one vectorised access.
    block_n = min(max(triton.next_power_of_2(N), 16), 1024)
    # ~4096 elements per program keeps 8-32 in flight per thread, enough to saturate HBM on an
    # H100; short on rows, the tile shrinks rather than masking most of its lanes off.
    block_m = min(max(4096 // block_n, 1), triton.next_power_of_2(M))
    num_warps = 8 if block_m * block_n >= 4096 else 4
    return block_m, block_n, num_warps


def _check_inputs(expr: dict, inputs) -> tuple[int, int, torch.dtype]:
    """Checks the tensors against the expression; returns M, N and the first full input's dtype."""
    kinds = expr["inputs"]
    if not isinstance(inputs, (list, tuple)) or len(inputs) != len(kinds):
        got = len(inputs) if isinstance(inputs, (list, tuple)) else type(inputs).__name__
        raise ValueError(f"expr takes {len(kinds)} inputs ({kinds}), got {got}")
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"input {i} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"input {i} has dtype {t.dtype}; use float32, float16 or bfloat16")
    first = inputs[kinds.index("full")]
    if first.dim() != 2:
        raise ValueError(
            f"full input {kinds.index('full')} has shape {tuple(first.shape)}; "
            f"pass [M, N] (flatten leading dims first)"
        )
    M, N = first.shape
    for i, (kind, t) in enumerate(zip(kinds, inputs)):
        if t.device != first.device:
            raise ValueError(f"input {i} is on {t.device}, expected {first.device}")
        if kind == "full":
            if tuple(t.shape) != (M, N):
                raise ValueError(f"full input {i} has shape {tuple(t.shape)}, expected ({M}, {N})")
            if N > 1 and t.stride(1) != 1:
                raise ValueError(
                    f"full input {i} has column stride {t.stride(1)}; call .contiguous() first"
                )
        else:
            if tuple(t.shape) != (N,):
                raise ValueError(f"col input {i} has shape {tuple(t.shape)}, expected ({N},)")
            if N > 1 and t.stride(0) != 1:
                raise ValueError(
                    f"col input {i} has stride {t.stride(0)}; call .contiguous() first"
                )
    return M, N, first.dtype


def pointwise(expr: dict, inputs: list, *, out=None, out_dtype=None) -> torch.Tensor:
    """Runs the generated kernel of ``expr`` on ``inputs``; the result is [M, N].

    Full inputs are [M, N] with contiguous rows (any row stride), col inputs [N] contiguous. The
    output dtype is ``out.dtype``, else ``out_dtype``, else that of the first full input.

        >>> import torch
        >>> expr = {"inputs": ["full"], "steps": [["mul", 0, {"const": 2.0}], ["relu", 1]]}
        >>> pointwise(expr, [torch.tensor([[-1.0, 3.0]])])
        tensor([[0., 6.]])
    """
    _check_expr(expr)
    M, N, dtype = _check_inputs(expr, inputs)
    device = inputs[0].device
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype is {out_dtype}; use float32, float16 or bfloat16")
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype or dtype, device=device)
    else:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.dtype not in FLOAT_DTYPES:
            raise ValueError(f"out has dtype {out.dtype}; use float32, float16 or bfloat16")
        if tuple(out.shape) != (M, N):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected ({M}, {N})")
        if N > 1 and out.stride(1) != 1:
            raise ValueError(f"out has column stride {out.stride(1)}; rows must be contiguous")
        if out.device != device:
            raise ValueError(f"out is on {out.device}, expected {device} like the inputs")
    if M == 0 or N == 0:
        return out

    kernel = _load_kernel(pointwise_source(expr))
    block_m, block_n, num_warps = _launch_config(M, N)
    strides = [out.stride(0)] + [t.stride(0) for t, k in zip(inputs, expr["inputs"]) if k == "full"]
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _launch.launcher(kernel, grid)(
        out, *inputs, M, N, *strides, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps
    )
    return out


_REFERENCE_OPS = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "pow": torch.pow,
    "neg": torch.neg,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "tanh": torch.tanh,
    "erf": torch.erf,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "abs": torch.abs,
}


def pointwise_reference(expr: dict, inputs: list, out_dtype=None) -> torch.Tensor:
    """``expr`` evaluated with torch ops in fp32, cast to ``out_dtype`` or the first full input's.

    >>> import torch
    >>> expr = {"inputs": ["full", "col"], "steps": [["add", 0, 1], ["tanh", 2]]}
    >>> pointwise_reference(expr, [torch.zeros(2, 3), torch.zeros(3)])
    tensor([[0., 0., 0.],
            [0., 0., 0.]])
    """
    _check_expr(expr)
    M, N, dtype = _check_inputs(expr, inputs)
    device = inputs[0].device
    values = [t.float() for t in inputs]
    for op, *args in expr["steps"]:
        operands = [
            # torch.full fills on the device (no host-to-device copy, so CUDA graphs can
            # capture it when a program runs this as a PyTorch op)
            torch.full((), float(a["const"]), dtype=torch.float32, device=device)
            if isinstance(a, dict)
            else values[a]
            for a in args
        ]
        values.append(_REFERENCE_OPS[op](*operands))
    return values[-1].expand(M, N).to(out_dtype or dtype)
