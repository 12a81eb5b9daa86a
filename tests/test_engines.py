"""Engines: rollout bookkeeping, LR schedule, reward scoring, checkpoint pointers, config errors (in process),
and the engine checks of tests/dist/engines_check.py: ZeRO-3 in 2 processes; in a launcher-less world of one,
the zero3 config at stage 0, and a forced ZeRO-2 actor with ZeRO-3 frozen models."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from vbon_ds.batching import batch_sizes
from vbon_ds.config import load_config
from vbon_ds.engines import distributed
from vbon_ds.engines.builders import build_critic, build_reference, build_reward, lr_factor, optimizer_steps
from vbon_ds.engines.checkpoint import latest_checkpoint, load_checkpoint, step_dirs
from vbon_ds.engines.distributed import free_port
from vbon_ds.engines.policy import finish_rollout
from vbon_ds.engines.reward import RewardScorer
from vbon_ds.errors import VbonError
from vbon_ds.rewards import get_reward_function, register_reward, reward_names, vowel_ratio
from vbon_ds.tiny import make_tiny_causal_lm, make_tiny_reward_model, make_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
EOS, PAD = 2, 0


def test_finish_rollout_masks_after_first_eos_and_pads():
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]])
    responses = torch.tensor([[5, EOS, PAD, PAD], [6, 7, 8, 9], [EOS, PAD, PAD, PAD]])
    sequences = torch.cat([torch.tensor([[PAD, 3, 4], [3, 4, 5], [4, 4, 4]]), responses], dim=1)
    logits = [torch.randn(3, 11) for _ in range(4)]
    rollout = finish_rollout(
        sequences, prompt_mask, logits, eos_ids=[EOS], pad_id=PAD, temperature=0.5, response_length=6
    )
    assert rollout.prompt_length == 3
    assert rollout.response_mask.tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert rollout.ended_with_eos.tolist() == [True, False, True]
    assert rollout.responses.tolist()[1] == [6, 7, 8, 9, PAD, PAD]
    assert torch.equal(rollout.attention_mask, torch.cat([prompt_mask, rollout.response_mask], dim=1))
    want = torch.stack([torch.log_softmax(step / 0.5, -1) for step in logits], 1).gather(
        -1, responses[..., None]
    )
    assert torch.allclose(rollout.sampling_logprobs[:, :4], want[..., 0] * rollout.response_mask[:, :4])
    assert rollout.sampling_logprobs.dtype == torch.float32
    assert (rollout.sampling_logprobs[rollout.response_mask == 0] == 0).all()


def test_lr_factor_warmup_then_cosine_or_constant():
    cosine = [lr_factor(s, warmup_steps=3, total_steps=13, schedule="cosine") for s in range(14)]
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(cosine[8], 0.5) and cosine[13] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(cosine[3:]))
    assert [lr_factor(s, warmup_steps=0, total_steps=5, schedule="constant") for s in (0, 4, 9)] == [1.0] * 3


def test_optimizer_steps_counts_epochs_and_minibatches():
    cfg = load_config(None, ["train.steps=10", "algo.ppo_epochs=4", "algo.num_minibatches=2"])
    assert optimizer_steps(cfg) == 80


def test_reward_registry():
    assert {"vader", "vowel_ratio"} <= set(reward_names())
    with pytest.raises(VbonError, match=r"unknown reward 'nope'.*vader"):
        get_reward_function("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("vader")(vowel_ratio)


def test_rule_rewards():
    assert vowel_ratio(["", "", ""], ["aeiou", "xyz a!", "123"]) == [1.0, 0.25, 0.0]
    pytest.importorskip("vaderSentiment")
    happy, sad = get_reward_function("vader")(["", ""], ["what a wonderful happy day", "awful, sad and bad"])
    assert happy > 0.5 and sad < -0.5


def test_scorer_with_function_and_missing_eos_score():
    scorer = RewardScorer(function=vowel_ratio, missing_eos_score=-1.0)
    scores = scorer.score(["p", "p"], ["aa", "ab"], ended_with_eos=torch.tensor([True, False]))
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0, -1.0]
    assert RewardScorer(function=vowel_ratio).score(["p"], ["ab"]).tolist() == [0.5]


def test_collectives_without_a_process_group():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object(3) == [3]
    assert distributed.all_reduce_max(7) == 7


def test_threads_per_rank_share_the_cores_unless_the_user_chose():
    assert distributed.threads_per_rank(16, 4, None) == 4
    assert distributed.threads_per_rank(2, 2, "") == 1
    assert distributed.threads_per_rank(2, 8, None) == 1  # more ranks than cores: one thread each
    assert distributed.threads_per_rank(16, 4, "3") is None  # OMP_NUM_THREADS set: torch follows it


@pytest.mark.parametrize(
    "env, want",
    [
        ({"LOCAL_SIZE": "3", "LOCAL_WORLD_SIZE": "5"}, 3),
        ({"LOCAL_WORLD_SIZE": "5", "WORLD_SIZE": "10"}, 5),
        ({"SLURM_TASKS_PER_NODE": "4(x2)", "WORLD_SIZE": "8"}, 4),
        ({"WORLD_SIZE": "6"}, 6),
        ({}, 1),
    ],
)
def test_local_world_size_from_the_launcher(monkeypatch, env, want):
    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "SLURM_TASKS_PER_NODE", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.local_world_size() == want


def test_checkpoint_pointers(tmp_path):
    assert latest_checkpoint(tmp_path) is None and step_dirs(tmp_path / "absent") == []
    (tmp_path / "step_00000003").mkdir()
    (tmp_path / ".tmp_step_00000004").mkdir()  # an interrupted save is never picked up
    (tmp_path / "latest").write_text("step_00000003")
    assert step_dirs(tmp_path) == [tmp_path / "step_00000003"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000003"
    with pytest.raises(VbonError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent", {})


def _cfg(*overrides):
    cfg = load_config(None, ["train.prompts_per_step=2", "train.micro_batch_size=2", *overrides])
    return cfg, batch_sizes(cfg, 1)


def test_config_errors_before_any_engine_is_built(tmp_path):
    actor = make_tiny_causal_lm(tmp_path / "actor")
    reference = make_tiny_causal_lm(tmp_path / "reference", vocab_size=280)
    tok = make_tiny_tokenizer(tmp_path / "tok")
    with pytest.raises(VbonError, match=r"set reward\.model .* or reward\.function"):
        build_reward(*_cfg())
    with pytest.raises(VbonError, match="actor and reference tokenizers differ"):
        build_reference(*_cfg(f"model.actor={actor}", f"model.reference={reference}"), tok)
    with pytest.raises(VbonError, match=r"critic .* tokenizers differ"):
        build_critic(
            *_cfg(f"model.actor={actor}", f"reward.model={reference}", "model.critic_init=reward"), tok
        )


def _run_engine_checks(tmp_path: Path, launcher: list[str], ds_config: str, *overrides: str) -> dict:
    make_tiny_causal_lm(tmp_path / "actor")
    make_tiny_reward_model(tmp_path / "reward")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, str(REPO / "tests" / "dist" / "engines_check.py"), str(tmp_path), ds_config, *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads((tmp_path / "results.json").read_text())

    # The HF export reloads as a plain model with the trained weights and the engine's logits.
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    check = torch.load(tmp_path / "export_check.pt")
    for name, p in exported.named_parameters():
        assert torch.equal(p, check["weights"][name]), name
    with torch.no_grad():
        logits = exported(input_ids=check["seq"], attention_mask=check["mask"]).logits
    torch.testing.assert_close(logits, check["logits"])
    assert (tmp_path / "export" / "tokenizer.json").is_file()
    return results


@pytest.mark.slow
def test_zero3_engines_two_processes(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    results = _run_engine_checks(tmp_path, [*torchrun, "--master_port", str(free_port())], "zero3")
    assert results["world_size"] == 2
    assert results["train_max_weight_diff"] < 1e-5 and results["reference_max_abs_diff"] < 1e-5
    # Each rank sampled its own prompts, rank 1 up to 7 tokens and rank 0 up to 4: both padded to 7.
    rollout0, rollout1 = results["rollouts"]
    assert rollout0 != rollout1 and results["response_lengths"] == [7, 7]


@pytest.mark.slow
def test_world_of_one_runs_zero3_config_at_stage_0(tmp_path):
    results = _run_engine_checks(tmp_path, [sys.executable], "zero3")
    assert results["world_size"] == 1 and results["train_max_weight_diff"] < 1e-5
    assert results["stages"] == {"actor": 0, "reference": 0, "reward": 0}


@pytest.mark.slow
def test_forced_zero2_actor_without_launcher(tmp_path):
    results = _run_engine_checks(tmp_path, [sys.executable], "zero2", "deepspeed.force_stage=true")
    assert results["world_size"] == 1 and results["train_max_weight_diff"] < 1e-5
    assert results["stages"] == {"actor": 2, "reference": 3, "reward": 3}
