"""vLLM sampler checks in one launch (torchrun --nproc_per_node 2, or plain python for a world of one).

    python tests/dist/vllm_check.py WORKDIR VARIANT [VARIANT ...]   # WORKDIR/actor: a tiny causal LM

VARIANT: full (every weight trains), lora (adapters, reference = adapters off), top (trainable_layers=1),
tp (the ranks share one engine: generation.vllm_tensor_parallel_size = 2), zero3_forced (ZeRO-3 in any world).
For each: the actor's and the reference's vLLM engines sample; their recorded log-probs must equal the
engines' own forward (fp32); then a few optimizer steps change the actor, and the next samples' log-probs
must equal the changed actor's forward (the weights were pushed), while the reference's stay the
reference's. Under ZeRO-3 at 2 ranks the pushes gather one block at a time. Then the actor's sampler is
asked for one answer token more, and for a prompt one token longer, than its engine was started for (both
refused). Rank 0 writes WORKDIR/results.json: per variant the largest log-prob differences, the weight
change, the blocks pushed, the refusals' messages; with tp also whether both samplers have the one
tensor-parallel group of size 2 (`distributed.tensor_parallel_group` makes one per size).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from vbon_ds.algorithms.rollout import encode_prompts
from vbon_ds.config import load_config
from vbon_ds.engines import distributed, vllm_sampler, weight_stream
from vbon_ds.engines.build import build_engines
from vbon_ds.errors import VbonError
from vbon_ds.models.tiny_models import SENTENCES

TEMPERATURE, NEW_TOKENS, STEPS = 0.9, 8, 3
VARIANTS = {
    "full": [],
    "lora": ["model.lora_rank=4", "model.lora_alpha=8"],
    "top": ["model.trainable_layers=1"],
    "zero3_forced": ["deepspeed.force_stage=true"],  # ZeRO-3 in a world of one (a live ZeRO-3 config)
    "tp": ["generation.vllm_tensor_parallel_size=2"],
}


def logprob_gap(engines, role: str, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |vLLM's recorded log-prob - the engine's forward| over this rank's answers (all ranks)."""
    rollout = engines.sampler(role).generate(ids, mask, temperature=TEMPERATURE, max_new_tokens=NEW_TOKENS)
    assert rollout.sampler_dtype == torch.float32 and rollout.sampled_entropy is None
    assert rollout.response_mask.sum() > 0
    forward = getattr(engines, role).response_logprobs(
        rollout.sequences, rollout.attention_mask, rollout.prompt_length, TEMPERATURE
    )
    gap = ((forward - rollout.sampled_logprobs) * rollout.response_mask).abs().max().item()
    return max(distributed.all_gather_object(gap))


def train_a_little(actor, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """STEPS optimizer steps raising the log-prob of fixed answers (a visible change of the weights)."""
    seq = torch.cat([ids, ids[:, :NEW_TOKENS]], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(ids[:, :NEW_TOKENS])], dim=1)
    for _ in range(STEPS):
        logp = actor.response_logprobs(seq, full_mask, ids.shape[1], TEMPERATURE)
        actor.backward(-logp.mean())
        actor.step()


def refusals(sampler, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The sampler's errors for one answer token more and a prompt one token longer (33) than it was
    started for ("" where it sampled instead)."""
    long_prompt = torch.full((1, 33), int(ids[0, -1]), device=ids.device)
    messages = []
    for prompt, prompt_mask, new_tokens in (
        (ids, mask, NEW_TOKENS + 1),
        (long_prompt, torch.ones_like(long_prompt), NEW_TOKENS),
    ):
        try:
            sampler.generate(prompt, prompt_mask, temperature=TEMPERATURE, max_new_tokens=new_tokens)
            messages.append("")
        except VbonError as err:
            messages.append(str(err))
    return messages


def check(workdir: Path, variant: str, rank_prompts: list[str]) -> dict[str, Any]:
    cfg = load_config(
        None,
        [
            f"model.actor={workdir / 'actor'}",
            "generation.engine=vllm",
            f"generation.max_new_tokens={NEW_TOKENS}",
            "data.max_prompt_tokens=32",
            "train.lr=0.05",
            "train.prompts_per_step=4",
            "train.micro_batch_size=2",
            "deepspeed.config=zero3",
            *VARIANTS[variant],
        ],
    )
    engines = build_engines(cfg, actor="train", reference=True)
    ids, mask = encode_prompts(engines.tokenizer, rank_prompts, 32)
    pushed: list[str] = []
    stream = weight_stream.checkpoint_weights

    def counting(source, **kwargs):
        for name, tensor in stream(source, **kwargs):
            pushed.append(name)
            yield name, tensor

    vllm_sampler.checkpoint_weights = counting
    result = {
        "actor_before": logprob_gap(engines, "actor", ids, mask),
        "reference_before": logprob_gap(engines, "reference", ids, mask),
    }
    first_push = len(pushed)
    before = engines.sampler("actor").generate(ids, mask, temperature=TEMPERATURE, max_new_tokens=NEW_TOKENS)
    train_a_little(engines.actor, ids, mask)
    pushed.clear()
    result["actor_after"] = logprob_gap(engines, "actor", ids, mask)
    result["reference_after"] = logprob_gap(engines, "reference", ids, mask)
    result["blocks_pushed_after"] = len(pushed)
    result["weights_pushed_first"] = first_push
    # The actor moved: its forward of the earlier answers changed.
    old = before.sampled_logprobs
    new = engines.actor.response_logprobs(
        before.sequences, before.attention_mask, before.prompt_length, TEMPERATURE
    )
    result["actor_change"] = max(
        distributed.all_gather_object(((new - old) * before.response_mask).abs().max().item())
    )
    result["sync_seconds"] = engines.weight_sync_seconds()
    result["refused"] = refusals(engines.sampler("actor"), ids, mask)
    if variant == "tp":  # made once per size: both samplers (and any later asker) share one group
        group = distributed.tensor_parallel_group(2)
        result["one_tp_group"] = all(
            engines.sampler(role)._tp_group is group for role in ("actor", "reference")
        )
    vllm_sampler.checkpoint_weights = stream
    return result


def first_token_counts(workdir: Path, samples: int) -> dict[str, list[float]]:
    """`samples` first answer tokens of one prompt from vLLM, and softmax(logits / T) of the frozen
    reference engine at that position: what a chi-square test compares; and the largest gap between
    vLLM's log-probs of whole answers and the engine's forward."""
    cfg = load_config(
        None,
        [
            f"model.actor={workdir / 'actor'}",
            "generation.engine=vllm",
            f"generation.max_new_tokens={NEW_TOKENS}",
        ],
    )
    engines = build_engines(cfg, reference=True)
    ids, mask = encode_prompts(engines.tokenizer, [SENTENCES[0]] * samples, 32)
    torch.manual_seed(0)
    rollout = engines.sampler("reference").generate(ids, mask, temperature=TEMPERATURE, max_new_tokens=1)
    first = rollout.responses[:, 0]
    counts = torch.bincount(first, minlength=len(engines.tokenizer)).double()
    with torch.no_grad():  # a world of one: the engine's module holds its whole weights
        logits = engines.reference.module(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1]
    probs = torch.softmax(logits.double() / TEMPERATURE, -1)
    return {
        "counts": counts.tolist(),
        "probs": probs[: len(counts)].tolist(),
        "logprob_gap": logprob_gap(engines, "reference", ids[:8], mask[:8]),
    }


def main(workdir: Path, variants: list[str]) -> None:
    distributed.init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    if variants[0].startswith("first_token="):
        samples = int(variants[0].split("=")[1])
        (workdir / "first_token.json").write_text(json.dumps(first_token_counts(workdir, samples)))
        return
    prompts = [SENTENCES[(rank + i) % len(SENTENCES)] for i in range(2 + rank)]  # ranks: other counts
    results = {"world_size": world} | {variant: check(workdir, variant, prompts) for variant in variants}
    if rank == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
