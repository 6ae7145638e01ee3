"""Fused linear layer: ``y = act(x @ weight.T + bias) + residual`` in one Triton kernel.

Every dense layer of a BERT-family encoder (QKV projection, attention output, both FFN layers,
pooler, classifier) is this one kernel, so the bias, the activation and the residual add are
applied to the fp32 accumulator in registers and the result is written to memory once. For few
rows, ``GemmConfig.split_k`` spreads K over several programs per output tile; the last of them
to finish sums the fp32 partials in a fixed order and applies the same epilogue. For many rows
of 16-bit inputs on Hopper, ``GemmConfig.backend == "tma"`` runs the same product and epilogue
as a persistent kernel whose tiles are loaded and stored through TMA descriptors.

>>> import torch
>>> from optimum_disc.kernels.matmul import linear, linear_reference, TOLERANCES
>>> x, w, b = torch.randn(7, 40), torch.randn(24, 40) / 40**0.5, torch.randn(24)
>>> y = linear(x, w, b, activation="gelu")
>>> torch.testing.assert_close(y, linear_reference(x, w, b, activation="gelu"),
...                            atol=TOLERANCES[y.dtype][0], rtol=TOLERANCES[y.dtype][1])
"""

from __future__ import annotations

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import interpreted
from . import launch as _pdl

try:  # Triton >= 3.4: compilation on a thread pool (kernels launched with warmup=True)
    from triton.runtime._async_compile import AsyncCompileMode
    from triton.runtime._async_compile import active_mode as _active_compile_mode
except ImportError:  # pragma: no cover - older Triton: the tuner compiles one kernel at a time
    AsyncCompileMode = None

try:  # Triton >= 3.4: tensor-memory-accelerator (TMA) descriptors made on the host
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the "tma" backend runs the plain kernel
    TensorDescriptor = None

ACTIVATIONS = (None, "gelu", "gelu_tanh", "tanh", "relu")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATION_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}

# Output-dtype tolerances (atol, rtol) for `linear` against `linear_reference`, for O(1) outputs
# (unit-variance x, weight scaled by 1/sqrt(K) as nn.Linear and trained BERT weights are).
# - float32: both sides accumulate exactly the same fp32 products but in a different order; the
#   difference grows like sqrt(K) * 2**-24 * |partial sums|, about 1e-6 at K = 4096, so 1e-5
#   relative with a 3e-5 floor for outputs near zero leaves a margin and still fails TF32 (errors
#   around 3e-4), which is the mistake this tolerance is there to catch.
# - float16 / bfloat16: the products of 16-bit inputs are exact in fp32 and the accumulation
#   differs by ~1e-6 as above, so the single rounding of the output dominates: kernel and
#   reference can land one ulp apart when their fp32 values straddle a rounding boundary.
#   One ulp is at most 2**-10 (fp16) and 2**-7 (bf16) relative; rtol allows two ulps, and atol
#   covers the fp32 difference on outputs near zero, where ulps are tiny.
TOLERANCES = {
    torch.float32: (3e-5, 1e-5),
    torch.float16: (1e-4, 2e-3),
    torch.bfloat16: (1e-4, 1.6e-2),
}
# The cuBLAS backend rounds the product to the output dtype before the activation and the
# residual add, then rounds again: two roundings, so an absolute error of up to one ulp of the
# product (which a residual add can leave on a small result). Outputs of order one: atol is one
# ulp at 1.0 doubled.
CUBLAS_TOLERANCES = {
    torch.float32: (3e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

# Hopper allows 227 KiB of shared memory per block; heuristics stay well under it because the
# epilogue's layout conversion needs scratch space on top of the pipelined operand buffers.
_SMEM_BUDGET = 200 * 1024
# What one block may use on Hopper (227 KiB).
_SMEM_HARDWARE = 227 * 1024
# H100 SXM. Only used to prefer smaller tiles when large ones would leave SMs idle.
_SM_COUNT = 132
# Up to this many rows a GEMM is bound by reading its weight, which a PDL launch prefetches into
# L2 while the previous kernel finishes; beyond it each weight tile is reused by many row tiles.
_PREFETCH_MAX_M = 256
# How the fp32 kernel launches where PDL is on (16-bit kernels launch with it in full):
# - "off": a plain launch;
# - "wait": a PDL launch that may start (and prefetch its weight) while the previous kernel
#   runs, but lets the next kernel start only once it has finished;
# - "on": as the 16-bit kernels, which let the next kernel's programs be scheduled as soon as
#   every one of their own has passed its wait.
# Measured on an H200, BERT-base fp32 at 2 x 16 with the same GEMM configs, in one process:
# 1.169 ms per call "off", 1.240 ms "wait", 1.375 ms "on" (docs/performance.md).
FP32_PDL = "off"
_FP32_PDL_MODES = ("off", "wait", "on")
# Up to this many rows (the row bucket, `m_bucket`), `_linear_kernel` reads its epilogue at run
# time: one compilation per tile for every epilogue of a model, where each new shape bucket's
# candidates are most of what its first call compiles (BERT-base fp16 on an H200: 47 kernels at
# 2 x 16, 21 at 1 x 128, each candidate once per epilogue). Above it the epilogue stays a
# compile-time constant: in 128 x 128 tiles the run-time branch made ptxas spill (Triton 3.9,
# sm_90: 208 bytes of stack where the constant epilogues without a residual had none).
_RUNTIME_EPILOGUE_MAX_M = 256
# Whether a PDL launch of few rows prefetches its slice of the weight into L2 before it waits.
PREFETCH_WEIGHTS = True
# How `linear` multiplies fp32 inputs (tl.dot's input_precision): "ieee", fp32 products on the
# FMA units, the products torch's fp32 matmul computes. "tf32x3" (each operand split into two
# TF32 halves, three tensor-core products) is for measurements only: it is not what fp32 means
# here.
FP32_DOT = "ieee"


BACKENDS = ("triton", "tma", "cublas")


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch options of one `linear` launch.

    >>> cfg = GemmConfig(block_m=64, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=3)
    >>> GemmConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    # "triton": the kernel of this file with the tiles above; "tma": the persistent kernel that
    # loads its tiles through TMA descriptors (16-bit inputs on Hopper and newer; elsewhere it
    # runs as "triton"); "cublas": the vendor library through torch (the tiles are unused),
    # with the epilogue as separate torch ops. The tuner times them all, since cuBLAS wins some
    # shapes (fp32 above all, where this kernel runs on FMA).
    backend: str = "triton"
    # Programs per output tile, each summing one slice of K (split-K, see `_linear_kernel`):
    # for few rows, where the tiles alone would leave most SMs idle. 1 is the plain kernel.
    split_k: int = 1

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(
                f"GemmConfig.backend={self.backend!r}: use one of {', '.join(map(repr, BACKENDS))}"
            )
        if self.backend == "tma" and self.split_k != 1:
            raise ValueError("GemmConfig.split_k must be 1 with backend='tma' (it is persistent)")
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            # tl.dot needs every dimension to be a power of two of at least 16.
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"GemmConfig.{name}={v!r}: use a power of two >= 16")
        if not isinstance(self.num_warps, int) or self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmConfig.num_warps={self.num_warps!r}: use 1, 2, 4, 8 or 16")
        for name in ("group_m", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"GemmConfig.{name}={v!r}: use an integer >= 1")
        v = self.split_k
        if isinstance(v, bool) or not isinstance(v, int) or v not in (1, 2, 4, 8, 16):
            raise ValueError(
                f"GemmConfig.split_k={v!r}: use a power of two from 1 to 16 (1, 2, 4, 8 or 16)"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GemmConfig:
        # Fields added after the first saved artifacts; dicts saved before them still load, with
        # the defaults (the Triton backend, no split-K).
        optional = {"backend": "triton", "split_k": 1}
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d and n not in optional]
        unknown = [k for k in d if k not in names]
        if missing or unknown:
            raise ValueError(
                f"GemmConfig.from_dict({d!r}): missing keys {missing}, unknown keys {unknown}; "
                f"expected exactly {names}"
            )
        values = {n: int(d[n]) for n in names if n not in optional}
        return cls(
            **values,
            backend=str(d.get("backend", optional["backend"])),
            split_k=int(d.get("split_k", optional["split_k"])),
        )

    def smem_bytes(self, dtype: torch.dtype) -> int:
        """Shared memory of the pipelined operand buffers, the part that grows with the tiles."""
        size = torch.empty((), dtype=dtype).element_size()
        return self.num_stages * (self.block_m + self.block_n) * self.block_k * size


@triton.jit
def _tanh(x):
    # Written with exp because libdevice's tanh does not exist on the CPU interpreter; exp(-2|x|)
    # never overflows, and the absolute error near zero (~1e-7) is below every tolerance.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _gelu(x):
    # Exact GELU, x * Phi(x), with Phi from erfc: erfc(t) = 2**q(t), t = |x| / sqrt(2), q a
    # degree-9 polynomial of s = min(t / 4, 1) fitted to log2(erfc) (minimax of the error in
    # erfc; past t = 4, erfc < 2e-8 is no longer seen next to 1). About 20 instructions per
    # element where erf from libdevice took about 32 (sm_90 SASS), and a GEMM's epilogue runs on
    # the same warps as its products: at BERT-base's 16,384 x 3072 FFN up projection the exact
    # GELU with libdevice's erf cost as much as a third of the kernel. Error over |x| <= 12,
    # against float64: at most 4e-7 absolute and 4e-6 relative for |GELU(x)| > 1e-3; torch's own
    # fp32 gelu, which computes 1 + erf and so cancels for negative x, is off by up to 1.3e-6
    # and 1e-3 there.
    s = tl.minimum(tl.abs(x) * 0.17677669529663687, 1.0)
    q = 3.0426095 * s - 10.025782
    q = q * s + 13.898496
    q = q * s - 9.318011
    q = q * s + 0.08697242
    q = q * s + 7.097446
    q = q * s - 9.491705
    q = q * s - 14.6950865
    q = q * s - 6.511629
    half_erfc = tl.exp2(q * s - 1.0)
    return x * tl.where(x >= 0, 1.0 - half_erfc, half_erfc)


@triton.jit
def _bias_activation(acc, offs_n, N, b_ptr, HAS_BIAS: tl.constexpr, ACTIVATION):
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if ACTIVATION == 1:  # gelu, exact (erf) form as torch's approximate="none"
        acc = _gelu(acc)
    elif ACTIVATION == 2:  # gelu_tanh, torch's approximate="tanh"
        inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = 0.5 * acc * (1.0 + _tanh(inner))
    elif ACTIVATION == 3:
        acc = _tanh(acc)
    elif ACTIVATION == 4:
        acc = tl.maximum(acc, 0.0)
    return acc


@triton.jit
def _finish(
    acc,
    offs_m,
    offs_n,
    M,
    N,
    b_ptr,
    r_ptr,
    stride_rm,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL,
    ACTIVATION,
):
    # The epilogue's arithmetic, before the store (per thread in `_epilogue`, or by TMA).
    acc = _bias_activation(acc, offs_n, N, b_ptr, HAS_BIAS, ACTIVATION)
    if HAS_RESIDUAL:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        r_ptrs = r_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :]
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _epilogue(
    acc,
    offs_m,
    offs_n,
    M,
    N,
    b_ptr,
    r_ptr,
    y_ptr,
    stride_rm,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL,
    ACTIVATION,
):
    # Bias, activation and residual on the fp32 accumulator, then one cast and one store.
    acc = _finish(
        acc, offs_m, offs_n, M, N, b_ptr, r_ptr, stride_rm, HAS_BIAS, HAS_RESIDUAL, ACTIVATION
    )
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _partial(ws_ptr, s, acc, pid_k, M, N, offs_m, offs_n, mask):
    # Partial sum of K slice s of this tile: the workspace's copy, or the calling program's own
    # accumulator for its own slice (the same fp32 values, so the sum does not depend on which
    # program finishes the tile). ".cg" reads from L2, past this SM's L1.
    rows = (s * M + offs_m).to(tl.int64)
    p = tl.load(
        ws_ptr + rows[:, None] * N + offs_n[None, :],
        mask=tl.where(pid_k == s, False, mask),
        other=0.0,
        cache_modifier=".cg",
    )
    return tl.where(pid_k == s, acc, p)


# M is not specialized (Triton would otherwise compile a kernel per M % 16 == 0 or M == 1): the
# tuner times each candidate at the bucket's row count, and the model runs it at any row count
# of the bucket, with the same compiled kernel. With ACTIVATION = HAS_RESIDUAL = -1 (what
# `linear` passes at few rows, `_RUNTIME_EPILOGUE_MAX_M`) the epilogue is read at run time from
# EPI_ACTIVATION and EPI_RESIDUAL instead, for the same reason: one compiled kernel per tile then
# serves every GEMM of a model (QKV, attention output, FFN up and down, pooler), so a new shape
# bucket compiles each candidate once rather than once per epilogue. The branch is uniform and
# taken once per tile, after the main loop.
@triton.jit(do_not_specialize=["M", "EPI_RESIDUAL", "EPI_ACTIVATION"])
def _linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    r_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_ym,
    EPI_RESIDUAL,
    EPI_ACTIVATION,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    F32_DOT: tl.constexpr = "ieee",
    PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = False,
    PF_LINES: tl.constexpr = 1,
    PF_STEP: tl.constexpr = 64,
    PDL_TRIGGER: tl.constexpr = True,
):
    # Programs walk the output in column-major super-blocks of GROUP_M row tiles, so the weight
    # tiles a wave of programs reads are shared through L2 instead of streamed once per row.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows and columns wrap onto valid ones, so the main loop loads need no M/N
    # mask; the duplicates are dropped by the masked store. Row offsets are 64-bit because
    # M * row stride passes 2**31 for large token counts of wide (e.g. QKV) buffers.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    # The weight is read as its transpose [BLOCK_K, BLOCK_N] straight from the [N, K] layout;
    # the compiler picks the K-contiguous shared-memory layout that the MMA accepts.
    w_ptrs = w_ptr + offs_k[:, None] + cols[None, :] * stride_wn

    if SPLIT_K == 1:
        k_first = 0
        k_end = tl.cdiv(K, BLOCK_K)
    else:
        # Program (tile, pid_k) sums K blocks [k_first, k_end): runs of ceil(blocks / SPLIT_K)
        # blocks, so the last slice is shorter, or empty when K has fewer blocks than slices.
        pid_k = tl.program_id(1)
        k_blocks = tl.cdiv(K, BLOCK_K)
        per_slice = tl.cdiv(k_blocks, SPLIT_K)
        k_first = pid_k * per_slice
        k_end = tl.minimum(k_first + per_slice, k_blocks)
        x_ptrs += k_first * BLOCK_K
        w_ptrs += k_first * BLOCK_K

    if PREFETCH:
        # Launched with PDL while the previous kernel still runs: bring this program's slice of
        # the weight (which no kernel writes) into L2, one request per 128-byte line, so that
        # the main loop below finds it there instead of waiting on device memory.
        offs_pf = tl.arange(0, PF_LINES) * PF_STEP
        for kk in range(k_first, k_end):
            k_pf = kk * BLOCK_K + offs_pf
            pf = w_ptr + k_pf[:, None] + cols[None, :] * stride_wn
            _pdl.prefetch_l2(tl.where(k_pf[:, None] < K, pf, w_ptr))
    if PDL:
        if PDL_TRIGGER:
            _pdl.wait_for_previous()
        else:
            _pdl.wait_only()  # the next kernel starts when this one has finished

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(k_first, k_end):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - kk * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST:
            # The interpreter multiplies bf16 as raw uint16; upcasting is exact, so the result
            # is what a bf16 tensor core with fp32 accumulation gives.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision=F32_DOT)
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if ACTIVATION < 0:
        has_residual = EPI_RESIDUAL != 0
        activation = EPI_ACTIVATION
    else:
        has_residual = HAS_RESIDUAL
        activation = ACTIVATION
    if SPLIT_K == 1:
        _epilogue(
            acc,
            offs_m,
            offs_n,
            M,
            N,
            b_ptr,
            r_ptr,
            y_ptr,
            stride_rm,
            stride_ym,
            HAS_BIAS,
            has_residual,
            activation,
        )
    else:
        # "The last program of a tile finishes it": every program stores its fp32 partial in
        # the workspace [SPLIT_K, M, N] and counts itself in on the tile's counter; the one
        # that sees SPLIT_K - 1 earlier arrivals sums the partials in slice order (0, 1, ...,
        # so the result is deterministic), applies the epilogue and resets the counter to 0
        # for the next launch. No program waits for another, so no schedule can deadlock.
        #
        # Memory ordering (PTX model): the barrier makes every thread's partial stores happen
        # before the counter update, which one thread of the program issues; acq_rel at GPU
        # scope publishes them (release) and, in the last program, orders the loads of the
        # other partials after the other programs' releases (acquire). Triton broadcasts the
        # scalar atomic's result to the program's threads through shared memory behind a
        # barrier, which carries the acquire to every thread; the partials are read with
        # ".cg" (from L2) all the same. Triton 3.9's sm_90 PTX for this reads: bar.sync;
        # thread 0 atom.global.gpu.acq_rel.add; st.shared; bar.sync; ld.shared (it adds a
        # barrier of its own before the atomic; the explicit one covers older versions).
        # Rows and columns past M and N are never stored: row s * M + m of slice s would be a
        # row of slice s + 1.
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        ws_rows = (pid_k * M + offs_m).to(tl.int64)
        ws_ptrs = ws_ptr + ws_rows[:, None] * N + offs_n[None, :]
        tl.store(ws_ptrs, acc, mask=mask, cache_modifier=".cg")
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = _partial(ws_ptr, 0, acc, pid_k, M, N, offs_m, offs_n, mask)
            for s in tl.static_range(1, SPLIT_K):
                total += _partial(ws_ptr, s, acc, pid_k, M, N, offs_m, offs_n, mask)
            # Every program of this tile has counted itself in, so nothing of this launch
            # touches the counter again; the next launch (stream order) sees 0.
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed", scope="gpu")
            _epilogue(
                total,
                offs_m,
                offs_n,
                M,
                N,
                b_ptr,
                r_ptr,
                y_ptr,
                stride_rm,
                stride_ym,
                HAS_BIAS,
                has_residual,
                activation,
            )


@triton.jit
def _tile_of(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # The tile order of `_linear_kernel`: column-major super-blocks of GROUP_M row tiles.
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit(do_not_specialize=["M"])
def _linear_tma_kernel(
    x_desc,
    w_desc,
    y_desc,
    b_ptr,
    r_ptr,
    y_ptr,
    w_ptr,
    M,
    N,
    K,
    stride_rm,
    stride_ym,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    TMA_STORE: tl.constexpr,
    PDL: tl.constexpr = False,
    LET_NEXT_START_AT_END: tl.constexpr = False,
    PREFETCH: tl.constexpr = False,
    PF_ELEMS: tl.constexpr = 64,
    PF_BLOCK: tl.constexpr = 256,
):
    # Persistent: program p computes tiles p, p + NUM_PROGRAMS, ... in the order of
    # `_tile_of`. The tile loop and the K loop are flattened into one software pipeline, so the
    # TMA loads of a program's next tile are in flight while it runs the epilogue of the current
    # one: at BERT's K = 768 (12 K blocks) a tile's pipeline fill and epilogue would otherwise
    # cost about as much as its main loop. TMA reads past M, N and K as zeros, so the loads
    # need no masks; the epilogue's masked store drops the rows and columns past M and N.
    # TMA_STORE: the output tile leaves through a TMA store (asynchronous, clipped at M and N)
    # instead of per-thread stores.
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    if PREFETCH:
        # Before the wait (the weight is written by no kernel): this program's share of the
        # whole weight, one request per 128-byte line (PF_ELEMS values), into L2, so that the
        # tiles' loads find it there instead of each waiting on device memory.
        lines_per_row = tl.cdiv(K, PF_ELEMS)
        lines = N * lines_per_row
        share = tl.cdiv(lines, NUM_PROGRAMS)
        for i in range(0, share, PF_BLOCK):
            j = i + tl.arange(0, PF_BLOCK)
            line = start * share + j
            row = line // lines_per_row
            ptrs = w_ptr + row.to(tl.int64) * stride_wn + (line % lines_per_row) * PF_ELEMS
            _pdl.prefetch_l2(tl.where((j < share) & (line < lines), ptrs, w_ptr))
    if PDL:
        if LET_NEXT_START_AT_END:
            _pdl.wait_only()
        else:
            _pdl.wait_for_previous()
    # The epilogue's tile is counted apart from the loop's, so that it does not keep the loop
    # variable alive across the flattened pipeline's stages.
    tile_out = start - NUM_PROGRAMS
    for tile in tl.range(start, num_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_of(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k_tiles):
            a = x_desc.load([pid_m * BLOCK_M, kk * BLOCK_K])
            b = w_desc.load([pid_n * BLOCK_N, kk * BLOCK_K])
            if UPCAST:
                # As in `_linear_kernel`: the interpreter's bf16 dot, made exact.
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32).T, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b.T, acc)
        tile_out += NUM_PROGRAMS
        pid_m, pid_n = _tile_of(tile_out, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if TMA_STORE:
            acc = _finish(
                acc,
                offs_m,
                offs_n,
                M,
                N,
                b_ptr,
                r_ptr,
                stride_rm,
                HAS_BIAS,
                HAS_RESIDUAL,
                ACTIVATION,
            )
            y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(y_desc.dtype))
        else:
            _epilogue(
                acc,
                offs_m,
                offs_n,
                M,
                N,
                b_ptr,
                r_ptr,
                y_ptr,
                stride_rm,
                stride_ym,
                HAS_BIAS,
                HAS_RESIDUAL,
                ACTIVATION,
            )
    if PDL and LET_NEXT_START_AT_END:
        _pdl.let_next_start()


def _check_matrix(name: str, t: torch.Tensor, shape: tuple[int, int] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; use one of {_FLOAT_DTYPES}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(
            f"{name} has strides {t.stride()}; the last dimension must have stride 1 "
            f"(call .contiguous() first)"
        )


def _validate(x, weight, bias, activation, residual, out):
    _check_matrix("x", x)
    m, k = x.shape
    _check_matrix("weight", weight)
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but x has shape {tuple(x.shape)}: "
            f"weight must be [N, K={k}] (nn.Linear layout, not transposed)"
        )
    if weight.dtype != x.dtype:
        raise ValueError(f"weight has dtype {weight.dtype} but x has {x.dtype}; cast one of them")
    if n == 0 or k == 0:
        raise ValueError(f"N={n} and K={k} must both be positive")
    if activation not in _ACTIVATION_IDS:
        raise ValueError(f"activation={activation!r} is not supported; use one of {ACTIVATIONS}")
    tensors = {"x": x, "weight": weight}
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias has shape {got}, expected ({n},)")
        if bias.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"bias has dtype {bias.dtype}; use one of {_FLOAT_DTYPES}")
        if n > 1 and bias.stride(0) != 1:
            raise ValueError(f"bias has stride {bias.stride()}; call .contiguous() first")
        tensors["bias"] = bias
    if residual is not None:
        _check_matrix("residual", residual, (m, n))
        tensors["residual"] = residual
    if out is not None:
        _check_matrix("out", out, (m, n))
        tensors["out"] = out
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    return m, n, k


def compile_threads() -> int:
    """Threads that compile the tuner's candidates side by side: ``OPTIMUM_DISC_COMPILE_THREADS``,
    else one per CPU core, at most 16 (1 compiles one kernel at a time)."""
    value = os.environ.get("OPTIMUM_DISC_COMPILE_THREADS")
    if value is None:
        return max(1, min(16, os.cpu_count() or 1))
    try:
        threads = int(value)
    except ValueError:
        threads = -1
    if threads < 1:
        raise ValueError(
            f"OPTIMUM_DISC_COMPILE_THREADS={value!r}: use a whole number of threads, at least 1"
        )
    return threads


@contextlib.contextmanager
def compile_pool(threads: int | None = None):
    """Inside, every kernel of this package that is called compiles on a pool of ``threads``
    threads (default `compile_threads`) instead of launching, and leaving waits for all of them
    (Triton's asynchronous compilation: its compilers spend most of their time outside the
    interpreter lock, so kernels compile side by side). A kernel that fails to compile is left
    for its first launch, which raises the same error.

    Yields False, and compiles nothing ahead (each kernel then compiles at its first launch),
    where that cannot be done: Triton without asynchronous compilation, one thread, the CPU
    interpreter, or inside another pool (pools do not nest).
    """
    threads = compile_threads() if threads is None else threads
    if (
        AsyncCompileMode is None
        or threads < 2
        or interpreted()
        or _active_compile_mode.get() is not None
    ):
        yield False
        return
    pool = ThreadPoolExecutor(threads)
    with pool, AsyncCompileMode(pool, ignore_errors=True), _pdl.compile_only():
        yield True


def compile_candidates(run, candidates: list[GemmConfig], threads: int | None = None) -> None:
    """Compile the kernels of ``candidates`` side by side before they are timed.

    ``run(config)`` is one `linear` call with the shapes and epilogue being tuned; inside
    `compile_pool` it only compiles. cuBLAS candidates have nothing to compile. Where
    `compile_pool` cannot compile ahead, the timed launches compile one at a time.
    """
    threads = compile_threads() if threads is None else threads
    todo = [cfg for cfg in candidates if cfg.backend != "cublas"]
    if len(todo) < 2:
        return
    with compile_pool(min(threads, len(todo))) as pooled:
        if not pooled:
            return
        for cfg in todo:
            try:
                run(cfg)
            except Exception:  # noqa: BLE001 - the timed launch reports it
                continue


def submit_candidates(
    m: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    device,
    activation: str | None = None,
    residual: bool = False,
) -> None:
    """Inside `compile_pool`: compile every Triton candidate that `tune` will time for this GEMM
    (the same tensors' shapes, so the timed launches find them compiled), without waiting."""
    if not _pdl.compiling_only():
        raise RuntimeError("submit_candidates only compiles: call it inside compile_pool()")
    x, res, y, bias, w = _tuning_tensors(m, n, k, dtype, device, residual)
    for cfg in tuning_candidates(m, n, k, dtype, device):
        if cfg.backend == "cublas":
            continue
        try:
            linear(x, w, bias, activation=activation, residual=res, out=y, config=cfg)
        except Exception:  # noqa: BLE001 - the timed launch reports it
            continue


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """y = act(x @ weight.T + bias) + residual, accumulated in fp32, cast once to the output dtype.

    x is [M, K] with unit last stride (a column slice of a wider buffer is fine); weight is
    [N, K] as in nn.Linear, same dtype as x; bias is [N] in any float dtype; residual and out are
    [M, N] with unit last stride. The output dtype is out's, or x's when out is None. out may be
    residual itself (in-place residual add) but must not overlap x or weight. fp32 inputs are
    multiplied in true fp32 (never TF32); fp16/bf16 use tensor cores with fp32 accumulation.
    A config with split_k > 1 is still one launch; it takes an fp32 workspace [split_k, M, N]
    per call and the device's shared tile counters (see `_COUNTERS` for the one rule: no two
    split-K launches on one device may run concurrently, e.g. on unordered streams).

    >>> import torch
    >>> x = torch.randn(5, 32)
    >>> w = torch.randn(16, 32)
    >>> y = linear(x, w, torch.zeros(16), activation="relu", residual=torch.ones(5, 16))
    >>> y.shape, bool((y >= 1).all())
    (torch.Size([5, 16]), True)
    """
    m, n, k = _validate(x, weight, bias, activation, residual, out)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if config is None:
        config = default_config(m, n, k, x.dtype)
    if config.backend == "cublas":
        if _pdl.compiling_only():
            return out  # nothing to compile
        if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
            # The caller turned TF32 on for torch; fp32 here means fp32, so keep the kernel.
            config = default_config(m, n, k, x.dtype)
        else:
            return _linear_cublas(x, weight, bias, activation, residual, out)
    upcast = x.dtype == torch.bfloat16 and interpreted()
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    if config.backend == "tma":
        if _tma_fits(x, weight):
            return _linear_tma(x, weight, bias, activation, residual, out, config, tiles, upcast)
        config = replace(config, backend="triton")
    if config.split_k == 1:
        grid = (tiles,)
        workspace = counters = x  # never read: SPLIT_K is 1
    else:
        grid = (tiles, config.split_k)
        # Every element that is read back is written first, in the same launch.
        workspace = torch.empty((config.split_k, m, n), dtype=torch.float32, device=x.device)
        counters = _tile_counters(x.device, tiles)
    bucket = m_bucket(m)
    runtime_epilogue = bucket <= _RUNTIME_EPILOGUE_MAX_M
    if x.dtype != torch.float32 or FP32_PDL == "on":
        pdl = _pdl.options(x.device)
    elif FP32_PDL == "wait":
        pdl = _pdl.options(x.device)
        if pdl["PDL"]:
            pdl["PDL_TRIGGER"] = False
    elif FP32_PDL == "off":
        pdl = {"PDL": False}
    else:
        raise ValueError(f"matmul.FP32_PDL is {FP32_PDL!r}; set one of {_FP32_PDL_MODES}.")
    if pdl["PDL"] and PREFETCH_WEIGHTS and bucket <= _PREFETCH_MAX_M:
        step = 128 // x.element_size()
        pdl.update(PREFETCH=True, PF_STEP=step, PF_LINES=max(config.block_k // step, 1))
    _pdl.launcher(_linear_kernel, grid)(
        x,
        weight,
        bias if bias is not None else x,  # never read: HAS_BIAS is False
        residual if residual is not None else x,  # never read: HAS_RESIDUAL is False
        out,
        workspace,
        counters,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        int(residual is not None),
        _ACTIVATION_IDS[activation],
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=-1 if runtime_epilogue else residual is not None,
        ACTIVATION=-1 if runtime_epilogue else _ACTIVATION_IDS[activation],
        IEEE=x.dtype == torch.float32 or upcast,
        UPCAST=upcast,
        EVEN_K=k % config.block_k == 0,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        SPLIT_K=config.split_k,
        F32_DOT=FP32_DOT if x.dtype == torch.float32 else "ieee",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl,
    )
    return out


def _tma_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the "tma" backend can run: 16-bit operands with 16-byte aligned rows (TMA's
    rule), on Hopper or newer or on the interpreter, with a Triton that has host descriptors."""
    if TensorDescriptor is None or x.dtype == torch.float32:
        return False
    if x.device.type == "cuda":
        if interpreted() or torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
    elif not interpreted():
        return False
    return _tma_aligned(x) and _tma_aligned(weight)


def _tma_aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


# Whether "tma" launches store their output tiles through TMA (16-bit, aligned outputs).
TMA_STORE = True
# Whether a "tma" launch with PDL brings its whole weight into L2 (each program a share)
# before it waits for the previous kernel. Alone, launched back to back, it changes nothing
# (each launch starts when the one before has finished); in the model, where the kernel before
# lets it start early, it took the movie-review pass from 161.1 to 158.4 ms (H200, BERT-base
# fp16, the mean of 5 and 7 timings in two runs; docs/performance.md) and left the latency
# shapes as they were.
TMA_PREFETCH = True
# How a "tma" launch takes part in PDL: "start" (it lets the next kernel start as soon as its
# programs run, as every other kernel does), "end" (once its programs are done) or "off"
# (launched without PDL). Measured at 128 x 128 (BERT-base, fp16, one run): 8.36, 7.47 and
# 7.55 ms; "end" keeps the next kernel's programs off the SMs while the persistent programs
# still run.
TMA_PDL = "end"


def _tma_pdl_options(device: torch.device) -> dict:
    options = _pdl.options(device)
    if not options["PDL"] or TMA_PDL == "off":
        return {"PDL": False}
    return {**options, "LET_NEXT_START_AT_END": TMA_PDL == "end"}


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, each walking several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def _linear_tma(x, weight, bias, activation, residual, out, config, tiles, upcast):
    m, k = x.shape
    n = weight.shape[0]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    x_desc = TensorDescriptor(x, [m, k], [x.stride(0), 1], [bm, bk])
    w_desc = TensorDescriptor(weight, [n, k], [weight.stride(0), 1], [bn, bk])
    # A constant program count (the SM count), so that every M of a bucket shares one compiled
    # kernel; with fewer tiles than SMs, each program has one tile. (Measured on an H200 with
    # exact GELU: two programs per SM where the shared memory holds them, 3% faster at 16,384
    # rows and 5% slower at 2,048; tiles not flattened into one pipeline with the K loop, 12 to
    # 23% slower: docs/performance.md.)
    programs = _sm_count(x.device)
    # The TMA store stages the tile in shared memory in the output dtype: 16-bit outputs only
    # (an fp32 tile of 128 x 256 would not fit beside the operand buffers), and with a
    # residual, whose load takes scratch space of its own, only where twice the tile still
    # fits beside the operand buffers (128 x 256 x 64 in 3 stages asked for 240 KiB on an H100).
    tile_bytes = bm * bn * out.element_size()
    staged = config.smem_bytes(x.dtype) + tile_bytes * (2 if residual is not None else 1)
    tma_store = (
        TMA_STORE and out.element_size() == 2 and _tma_aligned(out) and staged <= _SMEM_HARDWARE
    )
    y_desc = TensorDescriptor(out, [m, n], [out.stride(0), 1], [bm, bn]) if tma_store else None
    _pdl.launcher(_linear_tma_kernel, (min(tiles, programs),))(
        x_desc,
        w_desc,
        y_desc if tma_store else x_desc,  # never used: TMA_STORE is False
        bias if bias is not None else x,  # never read: HAS_BIAS is False
        residual if residual is not None else x,  # never read: HAS_RESIDUAL is False
        out,
        weight,
        m,
        n,
        k,
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        weight.stride(0),
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        ACTIVATION=_ACTIVATION_IDS[activation],
        UPCAST=upcast,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=config.group_m,
        NUM_PROGRAMS=programs,
        TMA_STORE=tma_store,
        PREFETCH=TMA_PREFETCH and _pdl.enabled(x.device),
        PF_ELEMS=128 // weight.element_size(),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **_tma_pdl_options(x.device),
    )
    return out


# Split-K tile counters, one zeroed int32 buffer per (device, size), shared by every split-K
# launch on that device and never freed. Each launch leaves the counters it used at 0 (the
# last program of a tile resets its counter), so no call does any host work or extra launch to
# clear them, and a launch captured in a CUDA graph keeps a valid buffer for every replay.
# Allocating zeros per call instead would be safe without any rule but costs a fill kernel per
# GEMM, about as much as split-K saves on the small GEMMs it is for.
# The rule that comes with sharing: split-K launches on one device that may run at the same
# time (on streams with no ordering between them, graphs replayed on such streams included)
# would count on the same counters and give wrong results. Launches in one stream are ordered,
# and the runtime serialises the calls of a model with its lock and launches them (or replays
# their graphs) on the caller's current stream; callers that run models concurrently on
# several streams of one device must keep split-K configs out (split_k=1 needs no counters).
# A launch that dies half-way leaves counters non-zero, but such a device error ends the CUDA
# context anyway.
_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    size = max(1024, triton.next_power_of_2(tiles))
    found = _COUNTERS.get((device, size))
    if found is not None:
        return found
    counters = torch.zeros(size, dtype=torch.int32, device=device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # First split-K launch of this size inside a graph capture: the zeroing is captured
        # with the launch and replayed before it, but it never runs eagerly, so the buffer
        # is not kept for eager calls.
        return counters
    return _COUNTERS.setdefault((device, size), counters)


def _linear_cublas(x, weight, bias, activation, residual, out):
    """The cuBLAS path: the product (with the bias in its epilogue) through torch, then the
    activation and the residual as torch ops, written into ``out``.

    Where ``out`` can take the product itself (contiguous, of x's dtype, sharing no memory with
    x or the residual), the product is written there and finished in place: the same torch
    kernels and roundings, bit for bit, without a temporary per step and the copy of the last
    one into ``out`` (at 16,384 rows of BERT-base in fp32, where the tuner takes cuBLAS for
    every GEMM, about 0.9 GB less memory traffic a layer)."""
    b = bias.to(x.dtype) if bias is not None else None
    if _writes_in_place(x, residual, out):
        if b is not None:
            torch.addmm(b, x, weight.t(), out=out)
        else:
            torch.mm(x, weight.t(), out=out)
        if activation is not None:
            _TORCH_ACTIVATIONS_IN_PLACE[activation](out)
        if residual is not None:
            out.add_(residual)
        return out
    y = torch.addmm(b, x, weight.t()) if b is not None else x @ weight.t()
    if activation is not None:
        y = _TORCH_ACTIVATIONS[activation](y)
    if residual is not None:
        y = y + residual
    out.copy_(y)
    return out


def _writes_in_place(x, residual, out) -> bool:
    """Whether `_linear_cublas` may compute in ``out``: contiguous, of x's (and the residual's)
    dtype, and in another allocation than x and the residual (``out`` may be the residual's own
    buffer, which the product would overwrite before the add reads it)."""
    others = [x] if residual is None else [x, residual]
    if not out.is_contiguous() or any(t.dtype != out.dtype for t in others):
        return False
    ptr = out.untyped_storage().data_ptr()
    return all(t.untyped_storage().data_ptr() != ptr for t in others)


_TORCH_ACTIVATIONS = {
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
    "tanh": torch.tanh,
    "relu": torch.relu,
}
# The same kernels, in place.
_TORCH_ACTIVATIONS_IN_PLACE = {
    "gelu": torch.ops.aten.gelu_,
    "gelu_tanh": lambda t: torch.ops.aten.gelu_(t, approximate="tanh"),
    "tanh": torch.tanh_,
    "relu": torch.relu_,
}


def linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain-PyTorch `linear`: fp32 math on upcast inputs, cast once to out_dtype (default x's).

    On a GPU the fp32 matmul follows torch's global precision setting: leave TF32 off
    (torch's default) when comparing with `linear`.

    >>> import torch
    >>> linear_reference(torch.ones(2, 3), torch.ones(4, 3), activation="tanh").shape
    torch.Size([2, 4])
    """
    if activation not in _ACTIVATION_IDS:
        raise ValueError(f"activation={activation!r} is not supported; use one of {ACTIVATIONS}")
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    if activation is not None:
        y = _TORCH_ACTIVATIONS[activation](y)
    if residual is not None:
        y = y + residual.float()
    return y.to(out_dtype or x.dtype)


# The cuBLAS backend (its tile fields are placeholders).
CUBLAS = GemmConfig(16, 16, 16, 1, 4, 1, backend="cublas")


def m_bucket(m: int) -> int:
    """Shape bucket of the token count M, the key under which tuned configs are stored.

    The next power of two of m, at least 16 (the smallest tile, below which every M runs the
    same config) and at most 65536 (BERT's largest batch x sequence; beyond it the best tiles
    no longer change).

    >>> [m_bucket(m) for m in (0, 1, 16, 17, 1000, 10**6)]
    [16, 16, 16, 32, 1024, 65536]
    """
    if m < 0:
        raise ValueError(f"m={m} must be >= 0")
    return min(max(16, triton.next_power_of_2(m)), 65536)


def _clamp(cfg: tuple[int, ...], bucket: int, n: int, k: int) -> GemmConfig:
    # Tiles wider than the problem only add masked work, so each side is cut to the problem's
    # next power of two (at least 16, tl.dot's minimum). An optional sixth entry is split_k.
    bm, bn, bk, warps, stages, *split = cfg
    return GemmConfig(
        block_m=min(bm, bucket),
        block_n=min(bn, max(16, triton.next_power_of_2(n))),
        block_k=min(bk, max(16, triton.next_power_of_2(k))),
        group_m=8,
        num_warps=warps,
        num_stages=stages,
        split_k=split[0] if split else 1,
    )


def _split_fits(cfg: GemmConfig, k: int) -> bool:
    """Whether every K slice of a split-K config still spans at least one whole K block."""
    return k // cfg.split_k >= cfg.block_k


# (block_m, block_n, block_k, num_warps, num_stages). Small M is bound by reading the weight
# once, so block_m covers all of M and narrow block_n spreads the weight over more SMs; large M
# is compute-bound, so the largest tiles that still give at least one full wave of programs win.
_DEFAULT_SMALL = {
    # m_bucket: fp16/bf16, fp32
    16: ((16, 32, 128, 4, 4), (16, 32, 64, 4, 3)),
    32: ((32, 32, 128, 4, 4), (32, 32, 64, 4, 3)),
    64: ((64, 32, 128, 4, 4), (64, 32, 64, 4, 3)),
}
_DEFAULT_LARGE = {
    # fp16/bf16 use wgmma tiles; fp32 ("ieee") runs on FMA units, where smaller K slices keep
    # the operand registers and the 4-byte shared-memory buffers in check.
    "16bit": ((128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)),
    "fp32": ((128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 3)),
}


@functools.lru_cache(maxsize=4096)
def _default_config(m: int, n: int, k: int, dtype: torch.dtype, interp: bool) -> GemmConfig:
    if interp:
        # The interpreter runs one numpy program per tile: small tiles keep the CPU tests fast
        # while still exercising several programs, the group ordering and every edge mask.
        return _clamp((16 if m <= 16 else 32, 32, 32, 4, 1), m_bucket(m), n, k)
    bucket = m_bucket(m)
    fp32 = dtype == torch.float32
    if bucket in _DEFAULT_SMALL:
        return _default_split_k(_clamp(_DEFAULT_SMALL[bucket][fp32], bucket, n, k), m, n, k)
    ladder = _DEFAULT_LARGE["fp32" if fp32 else "16bit"]
    for cfg in map(functools.partial(_clamp, bucket=bucket, n=n, k=k), ladder):
        if triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n) >= _SM_COUNT:
            return cfg
    return _clamp(ladder[-1], bucket, n, k)


def _default_split_k(cfg: GemmConfig, m: int, n: int, k: int) -> GemmConfig:
    # Few rows and a long K (BERT's FFN down projection, K = 3072 or 4096): the tiles alone
    # give a few dozen programs that each stream a full K of the weight while most SMs idle.
    # Split K while the programs still fit in one wave and each slice keeps at least four K
    # blocks of pipelined loads; shorter K is left to the tuner.
    if k < 2048:
        return cfg
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    split = 1
    while split < 8 and tiles * split * 2 <= _SM_COUNT and k // (split * 2) >= 4 * cfg.block_k:
        split *= 2
    return replace(cfg, split_k=split)


def default_config(m: int, n: int, k: int, dtype: torch.dtype) -> GemmConfig:
    """Heuristic config for an [m, k] x [n, k] product, tuned by hand for H100 and BERT shapes.

    >>> import torch
    >>> default_config(4096, 3072, 768, torch.float16).block_m >= 16
    True
    """
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype} is not supported; use one of {_FLOAT_DTYPES}")
    return _default_config(m, n, k, dtype, interpreted())


# Every candidate costs a compilation per epilogue at a model's first calls (about half a second
# of a core each), so the lists keep what won somewhere. Dropped after 382 tunings recorded under
# docs/benchmarks/ (BERT-base, RoBERTa, DistilBERT, DeBERTa-v3, ModernBERT; fp32, fp16, bf16;
# H100 and H200) in which they won nothing that another candidate would not give as well: 16-bit,
# five tiles of the small list, four of the large list and three split-K tiles; fp32, eight of
# the ten plain tiles at up to 256 rows (split-K tiles or cuBLAS won there), six of ten above it
# (cuBLAS won all 48) and three split-K tiles.
_CANDIDATES = {
    # (block_m, block_n, block_k, num_warps, num_stages), per dtype class and M regime.
    ("16bit", "small"): (
        (16, 32, 128, 4, 4),
        (16, 64, 128, 4, 4),
        (16, 32, 256, 4, 3),
        (16, 128, 64, 4, 4),
        (32, 32, 128, 4, 4),
        (64, 32, 128, 4, 4),
        (64, 64, 128, 4, 3),
        # The fastest tile of a 16-bit sweep (`scripts/gemm_bench.py --sweep16`, 113 to 252
        # tiles per projection, H200) for QKV and FFN up at 32 rows: 9 to 10% under the list's.
        (32, 32, 256, 4, 3),
    ),
    ("16bit", "large"): (
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 128, 128, 4, 3),
    ),
    # fp32 tiles without split-K: none won at up to 256 rows (split-K or cuBLAS did), nor above
    # (cuBLAS did, 48 of 48); a few stay for when cuBLAS is not a candidate (TF32 allowed).
    ("fp32", "small"): (
        (32, 32, 64, 4, 3),
        (64, 64, 32, 4, 3),
    ),
    ("fp32", "large"): (
        (128, 128, 32, 8, 3),
        (128, 64, 32, 4, 3),
        (64, 128, 32, 4, 3),
        (64, 64, 32, 4, 3),
    ),
}


# Split-K candidates for the small-M regime (m_bucket <= 256), the same tuples with split_k
# sixth. A slice needs at least one whole K block, so short K keeps only the lower splits.
_SPLIT_K_CANDIDATES = {
    "16bit": (
        (64, 32, 128, 4, 4, 2),
        (64, 32, 128, 4, 4, 4),
        (64, 64, 128, 4, 3, 4),
        # The sweep's fastest for FFN down (K = 3072) at 32 and 128 rows: 7 to 9% under the
        # list's best.
        (32, 16, 256, 2, 3, 2),
        (64, 32, 256, 4, 3, 2),
    ),
    "fp32": (
        (64, 32, 64, 4, 3, 4),
        (64, 64, 32, 4, 3, 4),
        (64, 64, 32, 4, 3, 8),
        # Narrow tiles of one or two warps over four or eight K slices: the fastest at 32 and
        # 128 rows of BERT-base's projections on an H200 (`scripts/gemm_bench.py --sweep`, a
        # grid of 168 to 180 tiles per projection: at 32 rows 15 to 19% faster than the two
        # narrow tiles these replace for QKV, FFN up and FFN down, a tie for the attention
        # output; at 128 rows within 2% of the grid's best Triton tile, except FFN up at 7%,
        # where cuBLAS wins by more).
        (32, 16, 32, 1, 3, 4),
        (32, 16, 64, 1, 3, 8),
        (32, 64, 32, 1, 3, 4),
        (32, 64, 64, 2, 3, 8),
    ),
}


# Persistent TMA kernel candidates (backend "tma"), 16-bit and at least _TMA_MIN_ROWS rows (the
# regime of compute-bound tiles, where hiding each tile's pipeline fill behind the next tile's
# loads is what the persistent kernel adds). The tuner times every candidate with its epilogue,
# which decides here: with exact GELU the persistent kernel ran 2.5 times slower than without
# (H200, 2,048 rows of BERT's FFN up: 45.8 against 18.5 us; the plain kernel 28.6 against
# 21.8), while without GELU it beat the plain kernel by 10 to 15% (docs/performance.md).
_TMA_MIN_ROWS = 512
_TMA_CANDIDATES = (
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
)


# GEMMs with fewer output columns than this (a classification head) are not tuned: one column
# of tiles, latency-bound whatever the tiles, and each new shape bucket would compile every
# candidate for them (about six kernels per bucket for BERT-base's classifier).
_TUNE_MIN_N = 32


def worth_tuning(n: int) -> bool:
    """Whether `tune` is worth its compilations for a product with ``n`` output columns; else
    the default config serves.

    >>> worth_tuning(768), worth_tuning(5)
    (True, False)
    """
    return n >= _TUNE_MIN_N


def candidate_configs(
    m: int, n: int, k: int, dtype: torch.dtype, tma: bool = True
) -> list[GemmConfig]:
    """Configs worth timing on Hopper for this shape and dtype; the default comes first.
    ``tma=False`` leaves out the "tma" backend (for GPUs older than Hopper), which is only
    a candidate for 16-bit inputs and at least 512 rows. Split-K is a candidate at up to 256
    rows. (Above, split-K candidates for outputs with fewer tiles than two waves of the GPU were
    timed and never chosen at BERT-base's shapes, on an H200: docs/performance.md.)

    >>> import torch
    >>> cands = candidate_configs(4096, 768, 768, torch.bfloat16)
    >>> default_config(4096, 768, 768, torch.bfloat16) == cands[0], len(cands) <= 20
    (True, True)
    """
    default = default_config(m, n, k, dtype)
    bucket = m_bucket(m)
    key = ("fp32" if dtype == torch.float32 else "16bit", "small" if bucket <= 256 else "large")
    found = [default]
    tuples = [(cfg, "triton") for cfg in _CANDIDATES[key]]
    if key[1] == "small":
        tuples += [(cfg, "triton") for cfg in _SPLIT_K_CANDIDATES[key[0]]]
    elif key[0] == "16bit" and tma and bucket >= _TMA_MIN_ROWS:
        tuples += [(cfg, "tma") for cfg in _TMA_CANDIDATES]
    for cfg, backend in tuples:
        c = replace(_clamp(cfg, bucket, n, k), backend=backend)
        if c not in found and c.smem_bytes(dtype) <= _SMEM_BUDGET and _split_fits(c, k):
            found.append(c)
    return found


def tuning_candidates(m: int, n: int, k: int, dtype: torch.dtype, device=None) -> list[GemmConfig]:
    """What `tune` times: `candidate_configs` (with "tma" ones only where ``device`` is a GPU
    of compute capability 9.0 or newer) and cuBLAS (unless TF32 is allowed for fp32, which the
    Triton kernel does not do: the tuner would trade precision for speed)."""
    tma = (
        device is not None and torch.device(device).type == "cuda" and TensorDescriptor is not None
    )
    if tma:
        tma = torch.cuda.get_device_capability(torch.device(device)) >= (9, 0)
    candidates = candidate_configs(m, n, k, dtype, tma=tma)
    if not (dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32):
        candidates.append(CUBLAS)
    return candidates


def tune(
    m: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    device,
    activation: str | None = None,
    residual: bool = False,
) -> GemmConfig:
    """Fastest of `tuning_candidates` for this shape and epilogue, timed as the model runs it
    (see `time_candidates`). On the CPU interpreter nothing is timed and the default is
    returned.

    >>> import torch
    >>> cfg = tune(8, 16, 32, torch.float32, "cpu")
    """
    if interpreted() or torch.device(device).type != "cuda":
        return default_config(m, n, k, dtype)
    timed = time_candidates(m, n, k, dtype, device, activation, residual)
    ran = [(ms, i) for i, (_, ms) in enumerate(timed) if ms is not None]
    if not ran:
        raise RuntimeError(
            f"no candidate config ran for m={m}, n={n}, k={k}, dtype={dtype} on {device}: "
            f"{[str(cfg) for cfg, _ in timed]}"
        )
    return timed[min(ran)[1]][0]


def time_candidates(
    m: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    device,
    activation: str | None = None,
    residual: bool = False,
    candidates: list[GemmConfig] | None = None,
    hot: bool = False,
) -> list[tuple[GemmConfig, float | None]]:
    """Milliseconds of one launch of each candidate (default: `tuning_candidates`) on a GPU,
    None for a config that does not compile (e.g. out of shared memory).

    Each candidate is captured in a CUDA graph of back-to-back launches over enough copies of
    the weight that they do not fit in L2, and the graph's replays are timed: in the model, a
    GEMM follows other kernels in a graph (launch gaps as there, and PDL's overlap where it is
    on) and finds its weight in device memory, not in L2. One launch timed alone would mostly
    measure launch latency for the small GEMMs, and pick among near-ties at random. Every
    candidate runs the model's epilogue (``activation``, ``residual``): its cost depends on the
    kernel and the tiles (an exact GELU is some 20 instructions per element, hidden only where
    another program's products run beside it on the SM), and cuBLAS runs it as separate kernels.
    ``hot=True`` (for measurements) launches as many times over one weight, which then stays in
    L2.
    """
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    device = torch.device(device)
    mb = m_bucket(m)
    x, res, y, bias, w = _tuning_tensors(m, n, k, dtype, device, residual)
    # Copies of the weight: a pass over them, with the activations, is twice the L2.
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    per_launch = (n * k + mb * (k + 2 * n)) * x.element_size()
    copies = max(1, min(_TUNE_MAX_COPIES, triton.cdiv(2 * l2, per_launch)))
    weights = [w] * copies
    if not hot:
        weights[1:] = [(torch.randn((n, k), device=device) / k**0.5).to(dtype) for _ in weights[1:]]

    def launches(cfg):
        for w in weights:
            linear(x, w, bias, activation=activation, residual=res, out=y, config=cfg)

    timed = []
    if candidates is None:
        candidates = tuning_candidates(m, n, k, dtype, device)
    compile_candidates(
        lambda cfg: linear(
            x, weights[0], bias, activation=activation, residual=res, out=y, config=cfg
        ),
        candidates,
    )
    for cfg in candidates:
        try:
            ms = _time_in_graph(lambda cfg=cfg: launches(cfg), device) / copies
        except (OutOfResources, CompilationError, RuntimeError):
            ms = None
        timed.append((cfg, ms))
    return timed


def _tuning_tensors(m, n, k, dtype, device, residual):
    """x, residual (or None), out, bias and weight of the tuner's launches: the bucket's row
    count, random values of the model's scale."""
    mb = m_bucket(m)
    x = torch.randn((mb, k), device=device).to(dtype)
    res = torch.randn((mb, n), device=device).to(dtype) if residual else None
    y = torch.empty((mb, n), device=device, dtype=dtype)
    bias = torch.randn(n, device=device, dtype=torch.float32)
    w = (torch.randn((n, k), device=device) / k**0.5).to(dtype)
    return x, res, y, bias, w


# At most this many weight copies per tuning graph (the 768 x 768 weight of BERT-base in fp16 is
# 1.2 MB: 85 copies pass 100 MB, twice an H100's L2).
_TUNE_MAX_COPIES = 128


def _time_in_graph(fn, device, replays: int = 5) -> float:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph (after one run
    outside the graph, which compiles its kernels)."""
    fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads' work (another model's calls) does not break this capture.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return sorted(times)[len(times) // 2]
