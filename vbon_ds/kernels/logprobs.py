"""`token_logprobs`: log softmax(logits / T) at the labels, O(tokens) extra memory, one autograd contract."""

from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

from vbon_ds.kernels.dispatch import backend_for

IGNORE_INDEX = -100

# Bytes of float32 [rows, vocab] per chunk, by device type. On CPU 8-32 MB chunks stay in cache and
# measured 3x faster than 64+ MB ones; on GPU chunks must be big enough that kernel launches do not dominate.
TOKEN_CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 256 << 20}


def chunk_rows(n_cols: int, device: torch.device, chunk_bytes: int | None, defaults: dict[str, int]) -> int:
    """Rows per chunk so that a float32 [rows, n_cols] block stays within `chunk_bytes` (at least one row)."""
    if chunk_bytes is None:
        chunk_bytes = defaults.get(device.type, defaults["cuda"])
    return max(1, chunk_bytes // (4 * n_cols))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16/32-bit inputs; float64 stays float64 (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def check_temperature(temperature: float) -> float:
    """1 / temperature, after checking that it is a positive number."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return 1.0 / float(temperature)


def prepare_labels(labels: Tensor, n_cols: int) -> tuple[Tensor, Tensor]:
    """Flat int64 labels that are safe to index with (0 where out of range) and the in-range mask."""
    flat = labels.reshape(-1).long()
    in_range = (flat >= 0) & (flat < n_cols)
    return torch.where(in_range, flat, 0), in_range


def finish(ctx, logp: Tensor, entropy: Tensor | None, labels: Tensor, in_range: Tensor) -> Tensor | tuple:
    """An autograd Function's outputs shaped like `labels`: ignored positions give 0, other bad labels nan."""
    ignored = labels.reshape(-1) == IGNORE_INDEX
    logp = torch.where(in_range, logp, torch.where(ignored, 0.0, torch.nan)).view(labels.shape)
    if entropy is None:
        return logp
    entropy = entropy.masked_fill_(ignored, 0.0).view(labels.shape)
    ctx.mark_non_differentiable(entropy)
    return logp, entropy


def _row_blocks(x: Tensor) -> list[Tensor]:
    """2-D [rows, vocab] views covering x's leading dims in order, without copying x (e.g. logits[:, :-1])."""
    if x.dim() == 1:
        return [x.unsqueeze(0)]
    try:
        return [x.view(-1, x.shape[-1])]
    except RuntimeError:  # leading dims not viewable as one: split on the first
        return [block for sub in x.unbind(0) for block in _row_blocks(sub)]


def _row_chunks(x: Tensor, backend: ModuleType, chunk_bytes: int | None) -> Iterator[tuple[int, Tensor]]:
    """(first flat row index, [rows, vocab] view) over all rows of x, chunked when the backend needs it."""
    rows = chunk_rows(x.shape[-1], x.device, chunk_bytes, TOKEN_CHUNK_BYTES) if backend.USES_SCRATCH else None
    start = 0
    for block in _row_blocks(x):
        for chunk in block.split(rows) if rows else [block]:
            yield start, chunk
            start += chunk.shape[0]


Outputs = tuple[Tensor, Tensor | None, Tensor | None]  # flat log-probs, entropy, (max, log-sum-exp) stats


def new_outputs(like: Tensor, n_rows: int, want_entropy: bool, want_grad: bool) -> Outputs:
    """Uninitialised flat outputs in the accumulation dtype; entropy and stats only when asked for."""
    acc = acc_dtype(like.dtype)
    logp = like.new_empty(n_rows, dtype=acc)
    entropy = like.new_empty(n_rows, dtype=acc) if want_entropy else None
    return logp, entropy, like.new_empty(n_rows, 2, dtype=acc) if want_grad else None


def rows_of(outputs: Outputs, lo: int, hi: int) -> Outputs:
    """Views of rows lo:hi of each output."""
    return tuple(None if out is None else out[lo:hi] for out in outputs)


def forward_chunks(
    backend: ModuleType, logits: Tensor, safe: Tensor, inv_t: float, outputs: Outputs, chunk_bytes: int | None
) -> None:
    """backend.forward_rows over all rows of logits [..., vocab], writing the flat outputs."""
    for lo, rows in _row_chunks(logits, backend, chunk_bytes):
        hi = lo + rows.shape[0]
        backend.forward_rows(rows, safe[lo:hi], inv_t, *rows_of(outputs, lo, hi))


def backward_chunks(
    backend: ModuleType,
    logits: Tensor,
    safe: Tensor,
    stats: Tensor,
    g: Tensor,
    inv_t: float,
    grad: Tensor,
    chunk_bytes: int | None,
) -> None:
    """backend.backward_rows over all rows of logits into grad (contiguous [rows, vocab]; may be logits)."""
    for lo, rows in _row_chunks(logits, backend, chunk_bytes):
        hi = lo + rows.shape[0]
        backend.backward_rows(rows, safe[lo:hi], stats[lo:hi], g[lo:hi], inv_t, grad[lo:hi])


def scaled_grad(grad_logp: Tensor, in_range: Tensor, inv_t: float, dtype: torch.dtype) -> Tensor:
    """d logp / d (logits / T) is scaled by 1/T; positions without a valid label get no gradient."""
    return torch.where(in_range, grad_logp.reshape(-1).to(dtype) * inv_t, 0.0)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, inv_t, want_entropy, want_grad, chunk_bytes):
        safe, in_range = prepare_labels(labels, logits.shape[-1])
        outputs = new_outputs(logits, safe.numel(), want_entropy, want_grad)
        forward_chunks(backend_for(logits.device), logits, safe, inv_t, outputs, chunk_bytes)
        logp, entropy, stats = outputs
        if want_grad:
            ctx.save_for_backward(logits, safe, in_range, stats)
            ctx.inv_t, ctx.chunk_bytes = inv_t, chunk_bytes
        return finish(ctx, logp, entropy, labels, in_range)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, *_):
        logits, safe, in_range, stats = ctx.saved_tensors
        g = scaled_grad(grad_logp, in_range, ctx.inv_t, stats.dtype)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        flat_grad = grad.view(-1, logits.shape[-1])
        backward_chunks(
            backend_for(logits.device), logits, safe, stats, g, ctx.inv_t, flat_grad, ctx.chunk_bytes
        )
        return grad, None, None, None, None, None


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    chunk_bytes: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(logits / temperature) at `labels`: float32 (float64 for float64 logits), labels' shape.

    logits: [..., vocab] in any float dtype and layout; labels: logits.shape[:-1], integers in [0, vocab) or
    IGNORE_INDEX (-100, gives 0 and no gradient; any other out-of-range label gives nan). Differentiable
    w.r.t. logits; backward recomputes the softmax from a saved per-row (max, log-sum-exp), so nothing of
    size [tokens, vocab] is kept besides the logits themselves. return_entropy=True also returns the entropy
    of the tempered distribution (0 at ignored positions, not differentiable). chunk_bytes bounds the torch
    path's float32 scratch per chunk (default: 16 MiB on CPU, 256 MiB on GPU).
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} != logits shape[:-1] {tuple(logits.shape[:-1])}"
        )
    inv_t = check_temperature(temperature)
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    return _TokenLogprobs.apply(logits, labels, inv_t, return_entropy, want_grad, chunk_bytes)
