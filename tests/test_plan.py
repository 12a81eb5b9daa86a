"""`vbon plan`: CLI exit codes and verdict, offload and LoRA in the arithmetic, the offline Pythia table, the
engines and phases of each algorithm, vLLM's share of the card, DeepSpeed's own estimators and the bytes
2-rank ZeRO-2/3 engines hold; the work (answers, tokens, hours) counted by hand on a tiny run.
(Exact agreement with measured ZeRO-3 partitions under partial training: tests/test_engines.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from test_engines import run_two_ranks
from transformers import AutoModelForCausalLM

from vbon_ds.algorithms.registry import training_memory_plan
from vbon_ds.algorithms.work_plan import ASSUMED_TOKENS_PER_SECOND, format_work, work_plan
from vbon_ds.cli import PLAN_DOES_NOT_FIT, main
from vbon_ds.config import load_config
from vbon_ds.engines.memory_plan import GIB, PYTHIA, format_plan, pythia_config
from vbon_ds.models.tiny_models import make_tiny_causal_lm, make_tiny_reward_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return make_tiny_causal_lm(root / "actor", "llama", n_layer=3), make_tiny_reward_model(root / "reward")


@pytest.mark.slow
def test_cli_prints_the_plan_and_its_exit_codes(models, tmp_path):
    actor, reward = models
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{actor: {actor}}}\nreward: {{model: {reward}}}\n"
        "train: {prompts_per_step: 8, micro_batch_size: 2}\n"
    )
    run = [sys.executable, "-m", "vbon_ds", "plan", "--config", str(config)]
    ok = subprocess.run([*run, "--world-size", "2"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    for engine in ("actor", "critic", "reference", "reward"):
        assert f"| {engine} | 3 |" in ok.stdout
    assert "fits a 80 GB card" in ok.stdout
    tight = subprocess.run(
        [*run, "--world-size", "2", "--gpu-memory-gb", "1e-9"], capture_output=True, text=True
    )
    assert tight.returncode == PLAN_DOES_NOT_FIT and "does NOT fit a 1e-09 GB card" in tight.stdout
    bad = subprocess.run([*run, "--world-size", "3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "train.prompts_per_step: 8 is not divisible by the world size 3" in bad.stderr


@pytest.mark.slow
def test_cli_answers_at_once_when_the_hub_does_not(tmp_path):
    """The TL;DR recipe names hub ids; with the hub unreachable (loopback port 9 refuses), the plan comes from
    the built-in table without the hub libraries' retries (98 s before; the timeout only guards a hang)."""
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""}
    run = [sys.executable, "-m", "vbon_ds", "plan", "--config", "launch/tldr_vbon.yaml", "--world-size", "8"]
    result = subprocess.run(run, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "note: model shapes from the built-in Pythia table (hub unreachable)" in result.stdout
    assert "Retry" not in result.stderr and "thrown while requesting" not in result.stderr


def test_offload_lora_and_frozen_layers_in_the_arithmetic(models):
    actor, reward = models
    base = [
        f"model.actor={actor}",
        f"reward.model={reward}",
        "train.prompts_per_step=8",
        "train.micro_batch_size=2",
    ]
    full = training_memory_plan(load_config(None, base), 2)
    assert [e.name for e in full.engines] == ["actor", "critic", "reference", "reward"]
    offload = training_memory_plan(load_config(None, [*base, "deepspeed.config=zero3_offload"]), 2).engines[0]
    assert offload.params == offload.grads == offload.optimizer == 0.0  # all on the CPU

    lora = training_memory_plan(
        load_config(None, [*base, "model.lora_rank=2", "model.lora_target_modules=q_proj"]), 2
    )
    assert [e.name for e in lora.engines] == ["actor", "critic", "reward"]  # reference: adapters off
    adapters = 3 * 2 * (32 + 32)  # 3 layers x rank 2 x (in + out) of a 32 x 32 projection
    assert lora.engines[0].shape.trainable_total == adapters
    assert lora.engines[0].elements["adam"] == 2 * adapters // 2  # two moments, half of them per rank

    top = training_memory_plan(load_config(None, [*base, "model.trainable_layers=1"]), 2).engines[0]
    assert top.shape.trained_layers == 1 and top.activations < full.engines[0].activations


def test_pythia_shapes_without_the_hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rule_reward = ["reward.function=vowel_ratio", "algo.name=rloo", "algo.samples_per_prompt=2"]
    cfg = load_config(None, ["model.actor=EleutherAI/pythia-2.8b", *rule_reward])
    plan = training_memory_plan(cfg, 8)
    actor = plan.engines[0]
    assert actor.shape.total == 2_775_208_960 and actor.shape.layers == PYTHIA["pythia-2.8b"][0]
    assert "model shapes from the built-in Pythia table (hub unreachable)" in plan.notes
    # ZeRO-3 over 8 ranks: 1/8 of the bf16 weights, plus whole copies of the small (persistent) tensors.
    assert actor.params / GIB == pytest.approx(2_775_208_960 * 2 / 8 / GIB, rel=0.01)


def test_a_plan_that_does_not_fit_exits_with_its_own_code(models, tmp_path, capsys):
    actor, reward = models
    args = ["plan", "--set", f"model.actor={actor}", "--set", f"reward.model={reward}", "--world-size", "1"]
    config = tmp_path / "run.yaml"
    config.write_text("train: {prompts_per_step: 4, micro_batch_size: 2}\n")
    assert main([*args, "--config", str(config)]) == 0
    assert main([*args, "--config", str(config), "--gpu-memory-gb", "1e-6"]) == PLAN_DOES_NOT_FIT == 3
    assert "does NOT fit a 1e-06 GB card" in capsys.readouterr().out


# ---------------------------------------------------------------- the algorithm decides engines and phases


@pytest.mark.parametrize(
    "algo, engines, phases",
    [
        ("ppo", ["actor", "critic", "reference", "reward"], ["rollout", "scoring", "training"]),
        ("rloo", ["actor", "reference", "reward"], ["rollout", "scoring", "training"]),
        ("bon_sft", ["actor", "reference"], ["training"]),
        ("dpo", ["actor", "reference"], ["training"]),
        ("ipo", ["actor", "reference"], ["training"]),
        ("bonbon", ["actor", "reference"], ["training"]),
    ],
)
def test_engines_and_phases_are_those_the_algorithm_runs(models, algo, engines, phases):
    actor, reward = models
    overrides = [
        f"model.actor={actor}",
        f"reward.model={reward}",
        f"algo.name={algo}",
        "algo.samples_per_prompt=2",
        "generation.engine=hf",
    ]
    plan = training_memory_plan(load_config(None, overrides), 2)
    assert [e.name for e in plan.engines] == engines
    assert list(plan.phases) == phases
    assert plan.engines[0].generation == (
        0.0 if algo in ("bon_sft", "dpo", "ipo", "bonbon") else pytest.approx(plan.phases["rollout"])
    )


@pytest.mark.parametrize("checkpointing", [True, False])
def test_pair_losses_hold_two_forward_graphs(models, checkpointing):
    actor, reward = models
    base = [f"model.actor={actor}", f"reward.model={reward}", f"model.gradient_checkpointing={checkpointing}"]
    one = training_memory_plan(load_config(None, [*base, "algo.name=bon_sft"]), 2).engines[0]
    for pair in ("dpo", "ipo", "bonbon"):
        two = training_memory_plan(load_config(None, [*base, f"algo.name={pair}"]), 2).engines[0]
        if checkpointing:  # twice the checkpointed layer inputs, one layer recomputed at a time
            assert two.activations - one.activations == pytest.approx(
                one.activations - one.activations_other / 3
            )
        else:
            assert two.activations == pytest.approx(2 * one.activations)
        assert two.resident == one.resident


# ---------------------------------------------------------------- DeepSpeed's estimators and measured ranks


def _deepspeed_estimates(total: int, largest_layer: int, world: int) -> tuple[int, int]:
    """DeepSpeed's GPU bytes per rank for model states without offload: (ZeRO-2, ZeRO-3)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, zero2 = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=world, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(
        total, largest_layer, num_gpus_per_node=world, cpu_offload=False, cpu_offload_params=False
    )
    return zero2, zero3


def _actor(overrides: list[str], stage: str, world: int):
    return training_memory_plan(load_config(None, [*overrides, f"deepspeed.config={stage}"]), world).engines[
        0
    ]


@pytest.mark.parametrize("size", ["tiny", "pythia-6.9b"])
def test_model_states_agree_with_deepspeeds_estimators(models, monkeypatch, size):
    """ZeRO-2: DeepSpeed's 2 + 18 bytes a parameter exactly (16-bit weights; 16-bit and fp32 gradients, fp32
    master and Adam partitions). ZeRO-3: never below its 18 bytes + 4 x the largest layer (it leaves out
    the 16-bit gradient partition, which the plan counts: the measured test below finds it on every rank)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    world = 8 if size == "pythia-6.9b" else 2
    if size == "tiny":
        path = str(models[0])
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    else:
        path = "EleutherAI/pythia-6.9b"
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(pythia_config(path))
    overrides = [f"model.actor={path}", "reward.function=vowel_ratio", "model.dtype=bfloat16"]
    overrides += ["train.prompts_per_step=32", "train.micro_batch_size=2"]
    zero2, zero3 = _actor(overrides, "zero2", world), _actor(overrides, "zero3", world)
    from deepspeed.runtime.zero.stage3 import model_to_params

    total, largest_layer = model_to_params(
        model
    )  # the total dedups by data pointer: all 0 on the meta device
    assert total == zero3.shape.total or size == "pythia-6.9b"
    ds_zero2, ds_zero3 = _deepspeed_estimates(zero3.shape.total, largest_layer, world)

    assert zero2.resident == pytest.approx(ds_zero2, rel=1e-4)  # padding to 2 x world elements
    assert zero3.model_states >= ds_zero3
    assert zero3.resident - zero3.grads == pytest.approx(18 * zero3.shape.total / world, rel=2e-2)
    if size == "pythia-6.9b":  # the figure: DeepSpeed says 15.1 GiB per GPU
        assert ds_zero3 / GIB == pytest.approx(15.1, abs=0.05)


def _measured_bytes(workdir: Path, stage: str) -> list[dict]:
    run_two_ranks(REPO / "tests" / "dist" / "plan_check.py", str(workdir), stage)
    return json.loads((workdir / f"{stage}.json").read_text())


@pytest.mark.slow
def test_model_states_are_the_bytes_zero2_and_zero3_ranks_hold(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests" / "dist"))
    from plan_check import overrides

    make_tiny_causal_lm(tmp_path / "actor", "llama", n_layer=3)
    for stage in ("zero2", "zero3"):
        actor = training_memory_plan(load_config(None, overrides(tmp_path, stage)), 2).engines[0]
        planned = {
            "params": actor.params,
            "grads": actor.grads,
            "grads32": actor.grads32,
            "optimizer": actor.optimizer,
        }
        for rank in _measured_bytes(tmp_path, stage):
            held = {k: rank[k] for k in ("params", "grads", "grads32")} | {
                "optimizer": rank["master"] + rank["adam"]
            }
            assert planned == held, stage


# ---------------------------------------------------------------- the work: answers, tokens, hours


@pytest.fixture
def prompt_dir(tmp_path):
    """12 training prompts and 3 evaluation prompts, one of them (id p0) also a training prompt."""
    root = tmp_path / "prompts"
    root.mkdir()
    rows = {"train": [f"p{i}" for i in range(12)], "validation": ["p0", "v1", "v2"]}
    for split, ids in rows.items():
        lines = [json.dumps({"id": i, "prompt": f"prompt {i}"}) for i in ids]
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _work_overrides(models, prompt_dir) -> list[str]:
    actor, _ = models
    return [
        f"model.actor={actor}",
        f"data.source={prompt_dir}",
        "data.max_train_prompts=10",
        "data.max_prompt_tokens=7",
        "generation.max_new_tokens=5",
        "generation.eval_samples=3",
        "generation.eval_temperatures=[0.5,1.0]",
        "vbon.num_ref_samples=6",
        "reward.function=vowel_ratio",
        "algo.name=rloo",
        "algo.samples_per_prompt=2",
        "algo.ppo_epochs=2",
        "train.steps=3",
        "train.prompts_per_step=4",
        "train.micro_batch_size=2",
    ]


def test_work_of_a_tiny_run_counted_by_hand(models, prompt_dir):
    work = work_plan(load_config(None, _work_overrides(models, prompt_dir)))
    assert (work.train.count, work.eval.count, work.train.exact) == (10, 3, True)
    assert work.cache_prompts == 10 + 3 - 1  # p0 is cached once
    answers = {job.job.split(" (")[0]: (job.answers, job.tokens) for job in work.jobs}
    assert answers == {
        "reference cache": (12 * 6, 12 * 6 * 5),
        "training rollouts": (3 * 4 * 2, 3 * 4 * 2 * 5),
        "evaluation": (2 * 3 * 3 * 2, 2 * 3 * 3 * 2 * 5),  # reference and policy, 3 prompts, 3 samples, 2 T
    }
    assert work.sequence_tokens == 7 + 5
    assert work.per_step == {  # 4 prompts x K=2 answers; bf16 on a GPU: the old log-probs are a forward
        "actor forward+backward (2 epochs)": 2 * 8,
        "actor forward (old log-probs)": 8,
        "reference forward": 8,
    }
    assert not work.notes  # 10 training prompts, 12 draws


def test_ppo_adds_the_critic_and_the_reward_model(models, prompt_dir):
    _, reward = models
    overrides = [*_work_overrides(models, prompt_dir), "algo.name=ppo", f"reward.model={reward}"]
    work = work_plan(load_config(None, [*overrides, "reward.function=", "algo.old_logprobs=sampling"]))
    assert work.per_step == {
        "actor forward+backward (2 epochs)": 16,
        "reference forward": 8,
        "critic forward (values)": 8,
        "critic forward+backward (2 epochs)": 16,
        "reward model forward": 8,
    }


@pytest.mark.parametrize("algo, rows", [("bon_sft", 1), ("dpo", 2), ("bonbon", 2)])
def test_offline_algorithms_generate_nothing_in_training(models, prompt_dir, algo, rows):
    overrides = [*_work_overrides(models, prompt_dir), f"algo.name={algo}", "algo.subsets_per_prompt=3"]
    work = work_plan(
        load_config(None, [*overrides, "algo.offline_epochs=2", "data.max_train_prompts=0", "vbon.n=4"])
    )
    assert [job.job.split(" (")[0] for job in work.jobs] == ["reference cache", "evaluation"]
    sequences = 4 * 3 * rows  # prompts x N-subsets x answers each subset trains on
    assert work.per_step == {
        "actor forward+backward (2 epochs)": 2 * sequences,
        "reference forward (at most: once per cached answer, then kept)": sequences,
    }
    assert f"{algo}: no rollouts; training reads the reference cache's answers" in work.notes
    # All 12 training prompts are cached, 12 draws: still no prompt cached in vain.
    assert work.cache_prompts == 12 + 3 - 1 and not any("draws" in n for n in work.notes)


def test_a_cache_larger_than_the_draws_and_a_hub_source_are_named(models, prompt_dir):
    overrides = _work_overrides(models, prompt_dir)
    larger = work_plan(load_config(None, [*overrides, "train.steps=2"]))  # 8 draws of 10 prompts
    assert "data.max_train_prompts=8 caches only the prompts the run can use" in larger.notes[0]
    hub = work_plan(load_config(None, [*overrides, "data.source=someone/not-downloaded"]))
    assert (hub.train.count, hub.train.exact, hub.cache_prompts) == (10, False, None)
    assert hub.eval.count is None and "not downloaded; set data.max_eval_prompts" in hub.eval.how
    assert "| reference cache (`vbon refcache`) | unknown |" in format_work(hub, 1, None)


def test_cli_prints_the_work_with_hours_at_the_given_rate(models, prompt_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("train: {output_dir: " + str(tmp_path / "run") + "}\n")
    args = ["plan", "--config", str(config), "--world-size", "2"]
    args += [arg for o in _work_overrides(models, prompt_dir) for arg in ("--set", o)]
    assert main([*args, "--tokens-per-second", "0.01"]) == 0
    out = capsys.readouterr().out
    hours = 12 * 6 * 5 / (0.01 * 2) / 3600
    assert f"| reference cache (`vbon refcache`) | 12 | 12 x M=6 = 72 | 360 | {hours:.2f} |" in out
    assert "at 0.01 generated tokens/s per GPU (--tokens-per-second)" in out
    assert main(args) == 0  # the default: the sampler's rate, labelled an assumption
    out = capsys.readouterr().out
    assert f"at {ASSUMED_TOKENS_PER_SECOND['vllm']:g} generated tokens/s per GPU (ASSUMED for vllm" in out
    assert "sampler: vllm, generation.engine=auto, assumed vllm" in out


@pytest.mark.parametrize("value", ["-3", "0", "nan", "inf", "fast"])
@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--tokens-per-second", "generated tokens per second per GPU"),
        ("--gpu-memory-gb", "the memory of one card in GB"),
    ],
)
def test_plan_refuses_a_flag_value_that_is_not_a_positive_number(flag, expected, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--config", "launch/tldr_vbon.yaml", "--world-size", "8", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"argument {flag}: expected {expected} (> 0), got {value!r}" in err


# ---------------------------------------------------------------- vLLM's share of the card


def test_vllm_takes_its_share_while_sampling_or_for_the_whole_step(models):
    actor, reward = models
    base = [f"model.actor={actor}", f"reward.model={reward}", "generation.vllm_gpu_memory_utilization=0.25"]
    hf = training_memory_plan(load_config(None, [*base, "generation.engine=hf"]), 2, 40)
    asleep = training_memory_plan(load_config(None, [*base, "generation.engine=auto"]), 2, 40)
    awake = training_memory_plan(load_config(None, [*base, "generation.vllm_sleep=false"]), 2, 40)
    share = 0.25 * 40 * GIB
    assert (hf.sampler, asleep.sampler, hf.vllm, asleep.vllm) == ("hf", "vllm", 0.0, share)
    assert hf.engines[0].generation > 0 and asleep.engines[0].generation == 0  # vLLM samples, not generate()
    assert asleep.phases["rollout"] == share and asleep.resident == hf.resident
    assert awake.phases["rollout"] == 0.0 and awake.resident == hf.resident + share
    assert "| vllm (sampling only) | - |" in format_plan(asleep) and "| vllm (resident) |" in format_plan(
        awake
    )
    assert "| vllm" not in format_plan(hf)
    offline = training_memory_plan(load_config(None, [*base, "algo.name=dpo"]), 2, 40)
    assert offline.vllm == 0.0 and "rollout" not in offline.phases  # no rollouts: no sampler


def test_vllm_share_decides_the_verdict(models, tmp_path, capsys):
    """The tiny models need a few MB: only vLLM's share of the card can push the plan past 90% of it."""
    actor, reward = models
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{actor: {actor}}}\nreward: {{model: {reward}}}\n")
    args = ["plan", "--config", str(config), "--world-size", "1", "--gpu-memory-gb", "10"]
    assert main([*args, "--set", "generation.vllm_gpu_memory_utilization=0.85"]) == 0
    assert main([*args, "--set", "generation.vllm_gpu_memory_utilization=0.95"]) == PLAN_DOES_NOT_FIT
    assert (
        main(
            [
                *args,
                *["--set", "generation.engine=hf", "--set", "generation.vllm_gpu_memory_utilization=0.95"],
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| vllm (sampling only) | - | - | - | - | - | - | - | - | - | 9.5 | - | - |" in out
