"""The lm head for the fused linear log-prob path: its full weight (gathered under ZeRO-3) and its input.

`PolicyEngine` runs the fused kernel inside the head's own forward, so ZeRO-3's hooks gather the weight for
forward and backward by themselves. For a loop of your own over a raw model: `hidden =
final_hidden_states(model, ids, mask)` first, then inside `with gathered_lm_head(model) as weight:` both
`linear_token_logprobs(hidden, weight, response_ids, temperature / scale)` and the backward pass, where
`scale` is the model's `logit_scale` (1 for most models; `PolicyEngine.logit_scale` measures it).
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def fusable_lm_head(model: nn.Module) -> nn.Module:
    """The output-embedding module, checked to compute logits as exactly hidden @ weight.T (what the fused
    kernel computes): no bias, no logit soft-capping."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm head)")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}'s lm head has a bias; the fused log-prob path has none")
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None):
        raise ValueError(
            f"{type(model).__name__} soft-caps its logits (config.final_logit_softcapping), which the fused "
            "log-prob path does not reproduce; use a model without logit soft-capping"
        )
    return head


def logit_scale(logits: Tensor, head_output: Tensor, model_type: str) -> float:
    """The s > 0 with `logits` == s x `head_output`: what a model multiplies its lm head's output by before
    returning it as logits (1 for most; Granite's 1 / logits_scaling, Cohere's logit_scale, Falcon-H1's
    lm_head_multiplier), measured on the model's own outputs for one batch by least squares.

    The fused path then computes log_softmax(s x hidden @ weight.T / temperature), the model's own
    distribution. Raises ValueError naming `model_type` when the logits are no such multiple (soft-capping,
    a bias, a shift): the fused path could not reproduce them.
    """
    refusal = (
        f"model type {model_type!r}: its logits are not a fixed positive multiple of its lm head's output "
        "(soft-capped, shifted or reshaped after the head), which the fused log-prob path cannot reproduce; "
        "use a model whose logits are its lm head's output times a constant"
    )
    if logits.shape != head_output.shape:
        raise ValueError(refusal)
    model, head = logits.double(), head_output.double()
    norm = (head * head).sum()
    scale = float((model * head).sum() / norm) if norm > 0 else 1.0
    # Each logit is the head's output times s, rounded once to the coarser of the two dtypes.
    eps = max(torch.finfo(logits.dtype).eps, torch.finfo(head_output.dtype).eps)
    if not scale > 0 or (model - scale * head).abs().max() > 4 * eps * model.abs().max():
        raise ValueError(refusal)
    return scale


@contextlib.contextmanager
def gathered_lm_head(model: nn.Module) -> Iterator[Tensor]:
    """Yield the full output-embedding weight [vocab, hidden] of a HF causal LM for the duration of the block.

    Under ZeRO-3 the weight is partitioned across ranks: this gathers it on every rank with
    `deepspeed.zero.GatheredParameters(weight, modifier_rank=None)` (read-only; nothing is broadcast back) and
    re-partitions it on exit. Memory cost: vocab x hidden x dtype bytes on every rank while the block runs
    (49152 x 576 x 2 B = 57 MB for SmolLM2-135M in bf16; 151936 x 3584 x 2 B = 1.1 GB for Qwen2-7B).
    Enter the block after the base model's forward: with tied input/output embeddings (GPT-2, SmolLM2) ZeRO-3
    re-partitions the weight as soon as the embedding layer has run. Run backward inside the block when the
    weight needs a gradient: the autograd graph refers to the weight, whose data ZeRO-3 releases on exit.
    A weight that is not ZeRO-3-partitioned is yielded as is.
    """
    weight = fusable_lm_head(model).weight
    if not hasattr(weight, "ds_id"):  # DeepSpeed tags ZeRO-3 parameters with ds_id
        yield weight
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        yield weight


def final_hidden_states(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs
) -> Tensor:
    """The last layer's hidden states after the final norm, [batch, seq, hidden]: what the lm head multiplies.

    Runs the causal LM's base model (`model.base_model`: GPT-2's transformer, LLaMA's model, GPT-NeoX's
    gpt_neox), so no [batch, seq, vocab] logits are computed; equal to
    `model(..., output_hidden_states=True).hidden_states[-1]` for those architectures.
    """
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.last_hidden_state
