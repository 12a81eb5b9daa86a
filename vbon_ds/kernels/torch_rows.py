"""Row kernels in plain torch, for CPU and as the fallback on GPU.

Each call handles one chunk of rows that the caller keeps small (`logprobs.chunk_rows`), so the few
[rows, vocab] float temporaries here stay bounded and, on CPU, cache-resident.
"""

import torch
from torch import Tensor

# The kernels allocate [rows, vocab] float temporaries, so `token_logprobs` feeds them bounded row chunks.
USES_SCRATCH = True


def _scaled(x: Tensor, inv_t: float, acc: torch.dtype) -> Tensor:
    # Cast before scaling: scaling in bf16 would round the tempered logits to bf16.
    x = x.to(acc)
    return x * inv_t if inv_t != 1.0 else x


def forward_rows(
    x: Tensor,
    labels: Tensor,
    inv_t: float,
    logp: Tensor,
    entropy: Tensor | None,
    stats: Tensor | None,
) -> None:
    """Write log softmax(x * inv_t) at `labels` into `logp`, optionally entropy and (max, log-sum-exp) stats.

    x: [rows, vocab] any float dtype and strides; labels: [rows] int64 in range; outputs: [rows] / [rows, 2].
    """
    xs = _scaled(x, inv_t, logp.dtype)
    # One fused pass; it computes (x - max) - log(sum), so the value at the argmax is exactly -log(sum).
    lsm = torch.log_softmax(xs, dim=-1)
    logp.copy_(lsm.gather(-1, labels[:, None]).squeeze(-1))
    if stats is not None:
        stats[:, 0] = xs.amax(dim=-1)
        stats[:, 1] = -lsm.amax(dim=-1)
    if entropy is not None:
        p = lsm.exp()
        # Clamp so that p = 0 lanes from -inf logits give 0 * finite = 0, not 0 * -inf = nan.
        entropy.copy_(p.mul_(lsm.clamp_(min=torch.finfo(lsm.dtype).min)).sum(dim=-1).neg_())


def backward_rows(x: Tensor, labels: Tensor, stats: Tensor, g: Tensor, inv_t: float, grad: Tensor) -> None:
    """Write (onehot(labels) - softmax(x * inv_t)) * g into `grad` ([rows, vocab], may be `x` itself).

    g: [rows], already scaled by inv_t and zero on ignored rows; stats: forward_rows' (max, log-sum-exp).
    """
    buf = grad if grad.dtype == g.dtype else torch.empty(x.shape, dtype=g.dtype, device=x.device)
    if buf.data_ptr() != x.data_ptr():  # callers pass either disjoint tensors or the same view twice
        buf.copy_(x)
    if inv_t != 1.0:
        buf.mul_(inv_t)
    # (x - max) - log-sum-exp rather than x - (max + log-sum-exp): exact for logits of any magnitude.
    buf.sub_(stats[:, :1]).sub_(stats[:, 1:]).exp_().mul_(-g[:, None])
    buf.scatter_add_(-1, labels[:, None], g[:, None])
    if buf is not grad:
        grad.copy_(buf)
