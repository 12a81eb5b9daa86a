"""`linear_token_logprobs`: token log-probs of hidden @ weight.T without ever holding the full logits."""

from collections.abc import Iterator

import torch
from torch import Tensor

from vbon_ds.kernels.dispatch import backend_for
from vbon_ds.kernels.logprobs import (
    backward_chunks,
    check_temperature,
    chunk_rows,
    finish,
    forward_chunks,
    new_outputs,
    prepare_labels,
    rows_of,
    scaled_grad,
)

# Bytes of float32 logits per chunk. Larger on CPU than the token path's chunks: the matmuls want a few
# hundred rows (16-64 MB chunks measured 20-40% slower than one big matmul; 128 MB as fast). The softmax
# inside a chunk still runs in the token path's cache-sized pieces.
LINEAR_CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 256 << 20}


def _logit_chunks(hidden: Tensor, weight: Tensor, step: int) -> Iterator[tuple[int, int, Tensor]]:
    """(lo, hi, hidden[lo:hi] @ weight.T) over the rows of hidden, reusing one buffer: a fresh allocation per
    chunk would page-fault its way through the whole [tokens, vocab] again."""
    buf = hidden.new_empty(min(step, hidden.shape[0]), weight.shape[0])
    for lo in range(0, hidden.shape[0], step):
        hi = min(lo + step, hidden.shape[0])
        yield lo, hi, torch.mm(hidden[lo:hi], weight.T, out=buf[: hi - lo])


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, inv_t, want_entropy, want_grad, chunk_bytes):
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        safe, in_range = prepare_labels(labels, weight.shape[0])
        outputs = new_outputs(hidden, safe.numel(), want_entropy, want_grad)
        backend = backend_for(hidden.device)
        step = chunk_rows(weight.shape[0], hidden.device, chunk_bytes, LINEAR_CHUNK_BYTES)
        for lo, hi, logits in _logit_chunks(flat_hidden, weight, step):
            forward_chunks(backend, logits, safe[lo:hi], inv_t, rows_of(outputs, lo, hi), None)
        logp, entropy, stats = outputs
        if want_grad:
            ctx.save_for_backward(flat_hidden, weight, safe, in_range, stats)
            ctx.inv_t, ctx.step = inv_t, step
            ctx.hidden_shape, ctx.weight_shape = hidden.shape, weight.shape
        return finish(ctx, logp, entropy, labels, in_range)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, *_):
        flat_hidden, weight, safe, in_range, stats = ctx.saved_tensors
        if weight.shape != ctx.weight_shape:
            raise RuntimeError(
                f"lm-head weight changed shape from {tuple(ctx.weight_shape)} to {tuple(weight.shape)} "
                "before backward (ZeRO-3 re-partitioned it?): run backward inside `gathered_lm_head`"
            )
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        g = scaled_grad(grad_logp, in_range, ctx.inv_t, stats.dtype)
        grad_hidden = torch.empty_like(flat_hidden) if need_hidden else None
        # Accumulated chunk by chunk in the weight's dtype (one rounding per chunk in bf16, as Liger does);
        # a float32 accumulator would cost vocab x hidden x 4 bytes more.
        grad_weight = torch.zeros_like(weight) if need_weight else None
        backend = backend_for(flat_hidden.device)
        # Logits are recomputed (saving them would hold [tokens, vocab] after all), then overwritten in place
        # by their gradient.
        for lo, hi, logits in _logit_chunks(flat_hidden, weight, ctx.step):
            backward_chunks(backend, logits, safe[lo:hi], stats[lo:hi], g[lo:hi], ctx.inv_t, logits, None)
            if need_hidden:
                torch.mm(logits, weight, out=grad_hidden[lo:hi])
            if need_weight:
                grad_weight.addmm_(logits.T, flat_hidden[lo:hi])
        if need_hidden:
            grad_hidden = grad_hidden.view(ctx.hidden_shape)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    chunk_bytes: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """`token_logprobs(hidden @ weight.T, labels, temperature)` without materialising the full logits.

    hidden: [..., hidden_size]; weight: [vocab, hidden_size] (the lm head, same dtype); labels: the leading
    shape of hidden. Works through chunks of tokens whose float32 logits fit in `chunk_bytes` (default 128 MiB
    on CPU, 256 MiB on GPU); backward recomputes each chunk's logits and softmax from the saved per-row
    (max, log-sum-exp) and gives gradients for hidden and weight. Extra memory: about two chunks (plus, in
    backward, the weight-sized gradient). Same labels, outputs and return_entropy as `token_logprobs`.
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} != hidden shape[:-1] {tuple(hidden.shape[:-1])}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight shape {tuple(weight.shape)} is not [vocab, {hidden.shape[-1]}]"
            " (a ZeRO-3 partition? see vbon_ds.engines.lm_head.gathered_lm_head)"
        )
    inv_t = check_temperature(temperature)
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearTokenLogprobs.apply(hidden, weight, labels, inv_t, return_entropy, want_grad, chunk_bytes)
