"""Partial training under ZeRO-3 (torchrun --nproc_per_node 2): model.trainable_layers and LoRA adapters.

    python tests/dist/partial_check.py WORKDIR MODE     # WORKDIR/actor from vbon_ds/models/tiny_models.py; MODE: layers | lora

Against a plain Hugging Face model with the same trainable subset (vbon_ds.models.adapters) and plain AdamW:
which parameters train, the weights after two steps, frozen weights untouched, and (LoRA) the reference as
the actor with its adapters off, equal to the untrained model. Then checkpoint, step, resume, step
(identical loss and weights), the HF export (LoRA merged), and each rank's measured element counts of
parameters, gradients and optimizer states for `vbon plan` to be compared with. Rank 0 writes
WORKDIR/MODE.json and WORKDIR/MODE_export_check.pt.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
from engines_check import CLIP, LR, PROMPT_LEN, STEPS, TEMPERATURE, WARMUP, fixed_batch, full_params, pg_loss
from engines_check import plain_logprobs as plain_lp
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from vbon_ds.models.adapters import apply_trainable_subset
from vbon_ds.batching import batch_sizes
from vbon_ds.config import load_config
from vbon_ds.engines import distributed
from vbon_ds.engines.builders import build_actor, build_reference, load_policy_tokenizer, lr_factor
from vbon_ds.engines.checkpoint import export_hf, load_checkpoint, save_checkpoint
from vbon_ds.engines.lora import AdapterReference

MODES = {
    "layers": ["model.trainable_layers=1"],
    "lora": ["model.lora_rank=4", "model.lora_alpha=8", "model.lora_target_modules=q_proj,v_proj,down_proj"],
}


def overrides(workdir: Path, world: int, mode: str) -> list[str]:
    """The run's config: 4 sequences per step over `world` ranks, ZeRO-3, the subset of `mode`."""
    return [
        f"model.actor={workdir / 'actor'}",
        "reward.function=vowel_ratio",
        "train.prompts_per_step=4",
        f"train.micro_batch_size={4 // world}",
        f"train.lr={LR}",
        f"train.warmup_steps={WARMUP}",
        "train.lr_schedule=cosine",
        f"train.steps={STEPS}",
        "algo.ppo_epochs=1",
        f"train.max_grad_norm={CLIP}",
        "train.weight_decay=0.01",
        "deepspeed.config=zero3",
        "model.gradient_checkpointing=true",
        *MODES[mode],
    ]


def measured_elements(actor) -> dict[str, int]:
    """This rank's elements of parameters, gradient partitions and optimizer states (fp32 master + Adam)."""
    opt = actor.ds.optimizer
    adam = [v for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    return {
        "params": sum(p.ds_tensor.numel() for p in actor.module.parameters()),
        "persistent": sum(p.ds_numel for p in actor.module.parameters() if p.ds_persist),
        "grads": opt.grad_partitions_flat_buffer.numel(),
        "master": sum(t.numel() for t in opt.fp32_partitioned_groups_flat),
        "adam": sum(t.numel() for t in adam),
    }


def main(workdir: Path, mode: str) -> None:
    distributed.init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    per_rank = 4 // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    cfg = load_config(None, overrides(workdir, world, mode))
    tokenizer = load_policy_tokenizer(cfg)
    results: dict[str, object] = {"world_size": world, "mode": mode}

    # The same subset on a plain model (same LoRA initialisation: the seed is the config's), before any engine.
    plain = AutoModelForCausalLM.from_pretrained(workdir / "actor")
    untouched = AutoModelForCausalLM.from_pretrained(workdir / "actor")
    apply_trainable_subset(plain, cfg.model, cfg.train.seed, lora=True)
    trainable = sorted(n for n, p in plain.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(
        [p for p in plain.parameters() if p.requires_grad], lr=LR, betas=tuple(cfg.train.adam_betas), eps=1e-8,
        weight_decay=0.01,
    )  # fmt: skip
    factor = functools.partial(lr_factor, warmup_steps=WARMUP, total_steps=STEPS, schedule="cosine")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

    torch.manual_seed(100 + rank)  # ranks' RNG differ, as in the trainer: LoRA init must not depend on it
    actor = build_actor(cfg, batch_sizes(cfg, world), tokenizer)
    assert actor.zero3
    assert sorted(n for n, p in actor.module.named_parameters() if p.requires_grad) == trainable
    results["trainable"] = trainable
    before_training = full_params(actor)
    assert_close(before_training, dict(plain.named_parameters()))  # LoRA starts where the plain one does
    seq, mask = fixed_batch(len(tokenizer))

    reference = build_reference(cfg, batch_sizes(cfg, world), tokenizer, actor)
    assert isinstance(reference, AdapterReference) == (mode == "lora")

    def train_step() -> float:
        loss = pg_loss(actor.response_logprobs(seq[rows], mask[rows], PROMPT_LEN, TEMPERATURE), mask[rows])
        actor.backward(loss)
        actor.step()
        return loss.item()

    for _ in range(2):
        loss = train_step()
        parts = [slice(r * per_rank, (r + 1) * per_rank) for r in range(world)]
        halves = [pg_loss(plain_lp(plain, seq[p], mask[p]), mask[p]) for p in parts]
        assert_close(torch.tensor(loss), halves[rank].detach())
        opt.zero_grad()
        (sum(halves) / len(halves)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in plain.parameters() if p.requires_grad], CLIP)
        opt.step()
        sched.step()
    weights, before = full_params(actor), dict(untouched.named_parameters())
    plain_weights = dict(plain.named_parameters())
    diffs = {n: (weights[n] - p.detach()).abs().max().item() for n, p in plain_weights.items()}
    assert max(diffs.values()) < 1e-5, diffs
    frozen = [n for n in weights if n not in trainable]
    assert all(torch.equal(weights[n], before[n.replace(".base_layer", "")]) for n in frozen)
    assert min((weights[n] - before_training[n]).abs().max().item() for n in trainable) > 1e-4
    results["train_max_weight_diff"] = max(diffs.values())

    if mode == "lora":  # the reference is the untrained model; the actor has moved away from it
        with torch.no_grad():
            ref_lp = reference.response_logprobs(seq[rows], mask[rows], PROMPT_LEN, TEMPERATURE)
            actor_lp = actor.response_logprobs(seq[rows], mask[rows], PROMPT_LEN, TEMPERATURE)
            want = plain_lp(untouched, seq[rows], mask[rows])
        assert_close(ref_lp, want)
        assert (actor_lp - want).abs().max() > 1e-4
        assert sorted(n for n, p in actor.module.named_parameters() if p.requires_grad) == trainable
        prompt = tokenizer(
            ["the movie was", "a lovely day", "i did not", "summarize: the cat"][rows],
            return_tensors="pt",
            padding=True,
        )
        rollout = reference.generate(
            prompt.input_ids, prompt.attention_mask, temperature=1.0, max_new_tokens=4, min_new_tokens=4
        )
        with torch.no_grad():
            assert_close(
                plain_lp_at(untouched, rollout), reference.response_logprobs(
                    rollout.sequences, rollout.attention_mask, rollout.prompt_length, 1.0
                ) * rollout.response_mask,
            )  # fmt: skip
    results["elements"] = distributed.all_gather_object(measured_elements(actor))

    # Checkpoint, step, resume, step: the same loss and weights, bit for bit.
    root = workdir / f"{mode}_checkpoints"
    save_checkpoint(root, 2, {"actor": actor}, {"step": 2}, keep_last=1)
    saved = full_params(actor)
    loss_after_save = train_step()
    weights_after_save = full_params(actor)
    assert load_checkpoint(root, {"actor": actor})["step"] == 2
    assert all(torch.equal(p, saved[n]) for n, p in full_params(actor).items())
    assert train_step() == loss_after_save
    assert all(torch.equal(p, weights_after_save[n]) for n, p in full_params(actor).items())

    export_hf(actor, tokenizer, workdir / f"{mode}_export")
    with torch.no_grad():
        logits = actor.ds(input_ids=seq, attention_mask=mask).logits
    if rank == 0:
        torch.save({"seq": seq, "mask": mask, "logits": logits}, workdir / f"{mode}_export_check.pt")
        (workdir / f"{mode}.json").write_text(json.dumps(results, indent=1))
    distributed.barrier()


def plain_lp_at(model: torch.nn.Module, rollout) -> torch.Tensor:
    """Log-probs of a rollout's response tokens under a plain model, temperature 1."""
    from vbon_ds.kernels import token_logprobs

    mask, seq, p = rollout.attention_mask, rollout.sequences, rollout.prompt_length
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=seq, attention_mask=mask, position_ids=pos).logits[:, p - 1 : -1]
    labels = seq[:, p:].masked_fill(mask[:, p:] == 0, -100)
    return token_logprobs(logits, labels, 1.0) * rollout.response_mask


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
