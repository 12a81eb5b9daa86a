"""Row kernels in Triton: one program per row, one pass over the vocab forward and one backward.

Same interface as `torch_rows`. Importing this module imports triton, so `dispatch` does it only on demand.
On CPU tensors the kernels run only under TRITON_INTERPRET=1 (for tests; 150-300x slower than torch).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

# The kernels stream rows without temporaries: `token_logprobs` hands them all rows in one launch.
USES_SCRATCH = False
# Wide enough to stream a row with few iterations, small enough to stay in registers; not tuned on a GPU yet.
_MAX_BLOCK = 4096


@triton.jit
def _forward_kernel(
    x_ptr,
    stride_row,
    stride_col,
    labels_ptr,
    logp_ptr,
    entropy_ptr,
    stats_ptr,
    n_cols,
    inv_t,
    ENTROPY: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows x vocab overflows int32 for 16k x 152k
    row_ptr = x_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)
    # Online log-sum-exp relative to the running max m: s = sum exp(x - m), t = sum exp(x - m) * (x - m).
    # m starts finite: exp(-inf - -inf) would be nan.
    m = tl.full((), -1e30, ACC)
    s = tl.zeros((), ACC)
    t = tl.zeros((), ACC)
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        x = tl.load(row_ptr + offs * stride_col, mask=offs < n_cols, other=-float("inf")).to(ACC) * inv_t
        m_new = tl.maximum(m, tl.max(x, 0))
        alpha = tl.exp(m - m_new)
        xs = x - m_new
        e = tl.exp(xs)
        if ENTROPY:
            # where() on xs, not on the product: masked lanes hold 0 * -inf.
            t = (t + s * (m - m_new)) * alpha + tl.sum(e * tl.where(e > 0, xs, 0.0), 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new
    label = tl.load(labels_ptr + row)
    x_label = tl.load(row_ptr + label * stride_col).to(ACC) * inv_t
    log_s = tl.log(s)
    tl.store(logp_ptr + row, (x_label - m) - log_s)
    if ENTROPY:
        tl.store(entropy_ptr + row, log_s - t / s)
    if STATS:
        tl.store(stats_ptr + 2 * row, m)
        tl.store(stats_ptr + 2 * row + 1, log_s)


@triton.jit
def _backward_kernel(
    x_ptr,
    stride_row,
    stride_col,
    labels_ptr,
    stats_ptr,
    g_ptr,
    grad_ptr,
    grad_stride_row,
    n_cols,
    inv_t,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * stride_row
    grad_row_ptr = grad_ptr + row * grad_stride_row
    m = tl.load(stats_ptr + 2 * row)
    log_s = tl.load(stats_ptr + 2 * row + 1)
    g = tl.load(g_ptr + row)
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        x = tl.load(row_ptr + offs * stride_col, mask=mask, other=0.0).to(ACC) * inv_t
        p_g = tl.exp((x - m) - log_s) * g
        grad = tl.where(offs == label, g - p_g, -p_g)
        tl.store(grad_row_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_params(x: Tensor) -> dict:
    block = min(triton.next_power_of_2(x.shape[1]), _MAX_BLOCK)
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    return {"BLOCK": block, "ACC": acc, "num_warps": 8 if block >= 2048 else 4}


def forward_rows(
    x: Tensor,
    labels: Tensor,
    inv_t: float,
    logp: Tensor,
    entropy: Tensor | None,
    stats: Tensor | None,
) -> None:
    """Same contract as `torch_rows.forward_rows`."""
    if x.shape[0] == 0:
        return
    _forward_kernel[(x.shape[0],)](
        x,
        x.stride(0),
        x.stride(1),
        labels,
        logp,
        logp if entropy is None else entropy,  # unused pointer when the constexpr flag is off
        logp if stats is None else stats,
        x.shape[1],
        inv_t,
        ENTROPY=entropy is not None,
        STATS=stats is not None,
        **_launch_params(x),
    )


def backward_rows(x: Tensor, labels: Tensor, stats: Tensor, g: Tensor, inv_t: float, grad: Tensor) -> None:
    """Same contract as `torch_rows.backward_rows`; `grad` must have unit column stride."""
    if x.shape[0] == 0:
        return
    _backward_kernel[(x.shape[0],)](
        x,
        x.stride(0),
        x.stride(1),
        labels,
        stats,
        g,
        grad,
        grad.stride(0),
        x.shape[1],
        inv_t,
        **_launch_params(x),
    )
