"""Engine checks in one launch (torchrun --nproc_per_node 2, or plain python for a world of one).

    python tests/dist/engines_check.py WORKDIR [DS_CONFIG [OVERRIDE ...]]   # WORKDIR: actor/, reward/

Each check compares the engines against plain, unsharded PyTorch / Hugging Face models loaded before any
engine exists: training steps (loss, updated weights, LR), reference log-probs, reward scores, critic values,
gathered vs synced generation, checkpoint round trip. DS_CONFIG (zero3 by default) sets the actor and critic
stage; reference and reward are ZeRO-3 regardless; a world of one runs everything at stage 0 unless an
OVERRIDE sets deepspeed.force_stage=true; gradient checkpointing is on. Checks assert here; rank 0
also writes WORKDIR/results.json, plus the inputs and logits pytest needs to test the HF export.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from vbon_ds.batching import batch_sizes
from vbon_ds.config import load_config
from vbon_ds.engines import distributed
from vbon_ds.engines.builders import (
    build_actor,
    build_critic,
    build_reference,
    build_reward,
    load_policy_tokenizer,
    lr_factor,
)
from vbon_ds.engines.checkpoint import export_hf, load_checkpoint, save_checkpoint
from vbon_ds.engines.checkpoint_layout import latest_checkpoint, step_dirs
from vbon_ds.kernels import token_logprobs

GLOBAL_BATCH, PROMPT_LEN, RESPONSE_LEN, TEMPERATURE = 4, 6, 5, 0.7
LR, WARMUP, STEPS, CLIP = 1e-2, 1, 3, 0.05


def fixed_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global batch on every rank: left-padded prompts, responses ending early in some rows."""
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(1, vocab, (GLOBAL_BATCH, PROMPT_LEN + RESPONSE_LEN), generator=gen)
    mask = torch.ones_like(seq)
    mask[1, :2] = 0  # left padding
    mask[2, -2:] = 0  # a response that ended 2 tokens early
    seq[mask == 0] = 0
    return seq, mask


def plain_logprobs(
    model: torch.nn.Module,
    seq: torch.Tensor,
    mask: torch.Tensor,
    prompt_len: int = PROMPT_LEN,
    temperature: float = TEMPERATURE,
) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=seq, attention_mask=mask, position_ids=pos).logits[:, prompt_len - 1 : -1]
    labels = seq[:, prompt_len:].masked_fill(mask[:, prompt_len:] == 0, -100)
    return token_logprobs(logits, labels, temperature)


def pg_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    response_mask = mask[:, PROMPT_LEN:]
    return -(logprobs * response_mask).sum() / response_mask.sum()


def full_params(engine) -> dict[str, torch.Tensor]:
    with engine.unsharded():
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def main(workdir: Path, ds_config: str, overrides: list[str]) -> None:
    distributed.init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    per_rank = GLOBAL_BATCH // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    cfg = load_config(
        None,
        [
            f"model.actor={workdir / 'actor'}",
            f"reward.model={workdir / 'reward'}",
            "model.critic_init=reward",
            f"train.prompts_per_step={GLOBAL_BATCH}",
            f"train.micro_batch_size={per_rank}",
            f"train.lr={LR}",
            f"train.warmup_steps={WARMUP}",
            "train.lr_schedule=cosine",
            f"train.steps={STEPS}",
            "algo.ppo_epochs=1",
            f"train.max_grad_norm={CLIP}",
            "train.weight_decay=0.01",
            f"deepspeed.config={ds_config}",
            "model.gradient_checkpointing=true",
            *overrides,
        ],
    )
    if not torch.cuda.is_available():  # LOCAL_SIZE from init_distributed: no `numactl` fork per call
        from deepspeed.accelerator import get_accelerator

        assert get_accelerator().device_count() == world, get_accelerator().device_count()
    sizes = batch_sizes(cfg, world)
    tokenizer = load_policy_tokenizer(cfg)
    results: dict[str, object] = {"world_size": world, "ds_config": ds_config}

    # Unsharded references, loaded before any HfDeepSpeedConfig exists (transformers would partition them).
    plain = AutoModelForCausalLM.from_pretrained(workdir / "actor")
    plain_ref = AutoModelForCausalLM.from_pretrained(workdir / "actor")
    plain_rm = AutoModelForSequenceClassification.from_pretrained(workdir / "reward")
    for model in (plain, plain_ref, plain_rm):
        model.config.pad_token_id = tokenizer.pad_token_id
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    betas = tuple(cfg.train.adam_betas)
    opt = torch.optim.AdamW(plain.parameters(), lr=LR, betas=betas, eps=1e-8, weight_decay=0.01)
    factor = functools.partial(lr_factor, warmup_steps=WARMUP, total_steps=STEPS, schedule="cosine")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

    actor = build_actor(cfg, sizes, tokenizer)
    reference = build_reference(cfg, sizes, tokenizer)
    critic = build_critic(cfg, sizes, tokenizer)
    reward = build_reward(cfg, sizes)
    # A world of one runs stage 0 unless deepspeed.force_stage keeps the JSON's stage.
    partitioned = world > 1 or cfg.deepspeed.force_stage
    assert actor.zero3 == critic.zero3 == (partitioned and ds_config == "zero3")
    assert reference.zero3 == reward.model.zero3 == partitioned
    results["stages"] = {
        name: engine.ds.zero_optimization_stage()
        for name, engine in (("actor", actor), ("reference", reference), ("reward", reward.model))
    }
    assert actor.module.training and actor.module.is_gradient_checkpointing and not reference.module.training
    seq, mask = fixed_batch(len(tokenizer))

    # Reference log-probs and entropy against the unsharded model.
    with torch.no_grad():
        ref_lp, ref_entropy = reference.response_logprobs(
            seq[rows], mask[rows], PROMPT_LEN, TEMPERATURE, return_entropy=True
        )
        want = plain_logprobs(plain_ref, seq[rows], mask[rows])
    assert_close(ref_lp, want)
    assert ref_lp.dtype == torch.float32 and ref_lp.shape == (per_rank, RESPONSE_LEN)
    assert bool((ref_entropy[mask[rows, PROMPT_LEN:] == 1] > 0).all())
    assert bool((ref_entropy[mask[rows, PROMPT_LEN:] == 0] == 0).all())
    results["reference_max_abs_diff"] = (ref_lp - want).abs().max().item()

    # Reward scores: ZeRO-3 reward model on re-tokenized text vs the unsharded classifier.
    prompts = tokenizer.batch_decode(seq[:, :PROMPT_LEN], skip_special_tokens=True)
    responses = tokenizer.batch_decode(seq[:, PROMPT_LEN:], skip_special_tokens=True)
    scores = reward.score(prompts[rows], responses[rows])
    enc = reward.tokenizer(
        [p + r for p, r in zip(prompts[rows], responses[rows], strict=True)],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        want_scores = plain_rm(**enc).logits[:, 0]
    assert_close(scores, want_scores)
    results["reward_max_abs_diff"] = (scores - want_scores).abs().max().item()

    # Critic values (trunk from the reward model) against the classifier's per-token scores.
    with torch.no_grad():
        values = critic.values(seq[rows], mask[rows], PROMPT_LEN)
        pos = (mask[rows].cumsum(-1) - 1).clamp(min=0)
        hidden = plain_rm(
            input_ids=seq[rows], attention_mask=mask[rows], position_ids=pos, output_hidden_states=True
        ).hidden_states[-1]
        want_values = plain_rm.score(hidden)[:, PROMPT_LEN - 1 : -1, 0] * mask[rows, PROMPT_LEN:]
    assert_close(values, want_values)
    critic_before = full_params(critic)
    critic.backward((critic.values(seq[rows], mask[rows], PROMPT_LEN) ** 2).mean())
    critic.step()
    assert any(not torch.equal(p, critic_before[n]) for n, p in full_params(critic).items())

    # Training steps: ZeRO-3 over `world` ranks vs plain AdamW on the whole batch (mean of the rank losses).
    def train_step() -> float:
        loss = pg_loss(actor.response_logprobs(seq[rows], mask[rows], PROMPT_LEN, TEMPERATURE), mask[rows])
        actor.backward(loss)
        actor.step()
        return loss.item()

    losses = []
    for _ in range(2):
        lr_before = actor.current_lr()
        assert abs(lr_before - sched.get_last_lr()[0]) < 1e-12, (lr_before, sched.get_last_lr())
        loss = train_step()
        halves = [
            pg_loss(plain_logprobs(plain, seq[part], mask[part]), mask[part])
            for part in (slice(r * per_rank, (r + 1) * per_rank) for r in range(world))
        ]
        assert_close(torch.tensor(loss), halves[rank].detach())
        opt.zero_grad()
        (sum(halves) / len(halves)).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), CLIP)
        opt.step()
        sched.step()
        losses.append(loss)
    weights = full_params(actor)
    diffs = [(weights[n] - p.detach()).abs().max().item() for n, p in plain.named_parameters()]
    changed = [(weights[n] - p.detach()).abs().max().item() for n, p in plain_ref.named_parameters()]
    assert max(diffs) < 1e-5, max(diffs)
    assert min(changed) > 1e-4, min(changed)
    results.update(train_losses=losses, train_max_weight_diff=max(diffs), lr_after=actor.current_lr())

    # Generation (actor and frozen reference): gathered once vs synced per layer, same seed, same rollout;
    # ranks stop at different lengths and are padded to the longest.
    prompt_text = ["the movie was", "a lovely day", "i did not", "summarize: the cat"][rows]
    prompt = tokenizer(prompt_text, return_tensors="pt", padding=True)
    for engine, plain_model in ((actor, plain), (reference, plain_ref)):
        rollouts = []
        for gather in (True, False):
            torch.manual_seed(1234 + rank)
            rollouts.append(
                engine.generate(
                    prompt.input_ids,
                    prompt.attention_mask,
                    temperature=1.0,
                    top_k=50,
                    top_p=0.95,
                    max_new_tokens=4 + 3 * rank,
                    min_new_tokens=2,
                    gather_params=gather,
                )
            )
        gathered, synced = rollouts
        for field in ("sequences", "attention_mask", "response_mask", "ended_with_eos"):
            assert torch.equal(getattr(gathered, field), getattr(synced, field)), field
        assert gathered.responses.shape[1] == 4 + 3 * (world - 1)
        seqs, masks, prompt_len = gathered.sequences, gathered.attention_mask, gathered.prompt_length
        with torch.no_grad():
            rescored = engine.response_logprobs(seqs, masks, prompt_len, temperature=1.0)
            want = plain_logprobs(plain_model, seqs, masks, prompt_len, temperature=1.0)
        assert_close(rescored, want * gathered.response_mask, atol=1e-4, rtol=1e-4)  # actor: trained copies
    # Log-probs and entropies recorded while sampling equal a forward over the rollout (min_new_tokens,
    # top-k and top-p act after the recording: both are of softmax(logits / T)), gathered or synced, rows
    # ending at any length.
    for engine in (actor, reference):
        for gather in (True, False):
            torch.manual_seed(99 + rank)
            rollout = engine.generate(
                prompt.input_ids, prompt.attention_mask, temperature=0.8, top_k=50, top_p=0.95,
                max_new_tokens=3 + 2 * rank, min_new_tokens=2, gather_params=gather, record_logprobs=True,
            )  # fmt: skip
            assert rollout.response_mask[:, :2].all()  # min_new_tokens still holds
            with torch.no_grad():
                logp, entropy = engine.response_logprobs(
                    rollout.sequences, rollout.attention_mask, rollout.prompt_length, 0.8, return_entropy=True
                )
            assert_close(rollout.sampled_logprobs, logp, atol=1e-4, rtol=1e-4)
            assert_close(rollout.sampled_entropy, entropy, atol=1e-4, rtol=1e-4)
    results["rollouts"] = distributed.all_gather_object(gathered.sequences.tolist())
    results["response_lengths"] = distributed.all_gather_object(gathered.responses.shape[1])

    # Checkpoint: save (keep 1 of 2), step, load, step again -> identical losses, weights and RNG draws.
    root = workdir / "checkpoints"
    engines = {"actor": actor, "critic": critic}
    save_checkpoint(root, 1, engines, {"step": 1}, keep_last=1)
    saved_state = {"step": 2, "losses": losses, "tensor": torch.arange(3)}  # rank 0's copy is kept
    save_checkpoint(root, 2, engines, saved_state, keep_last=1)
    assert [p.name for p in step_dirs(root)] == ["step_00000002"]
    assert latest_checkpoint(root) == root / "step_00000002"
    saved_weights = full_params(actor)
    draw = torch.rand(3)
    loss_after_save = train_step()
    weights_after_save = full_params(actor)
    state = load_checkpoint(root, engines)
    assert (
        state["step"] == 2
        and state["losses"] == distributed.broadcast_object(losses)
        and torch.equal(state["tensor"], torch.arange(3))
    )
    assert torch.equal(torch.rand(3), draw)
    assert all(torch.equal(p, saved_weights[n]) for n, p in full_params(actor).items())
    assert train_step() == loss_after_save
    assert all(torch.equal(p, weights_after_save[n]) for n, p in full_params(actor).items())

    # HF export: pytest reloads it and compares weights and logits.
    export_hf(actor, tokenizer, workdir / "export")
    with torch.no_grad():
        logits = actor.ds(input_ids=seq, attention_mask=mask).logits
    if rank == 0:
        weights = {n: w.cpu() for n, w in weights_after_save.items()}
        torch.save(
            {"weights": weights, "seq": seq, "mask": mask, "logits": logits}, workdir / "export_check.pt"
        )
        (workdir / "results.json").write_text(json.dumps(results, indent=1))
    distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "zero3", sys.argv[3:])
