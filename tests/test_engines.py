"""Engines: rollout bookkeeping, LR schedule, reward scoring, checkpoint pointers, config errors (in process),
and the engine checks of tests/dist/engines_check.py: ZeRO-3 in 2 processes; in a launcher-less world of one,
the zero3 config at stage 0, and a forced ZeRO-2 actor with ZeRO-3 frozen models."""

import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from vbon_ds.algorithms.registry import training_memory_plan as memory_plan
from vbon_ds.batching import batch_sizes
from vbon_ds.config import load_config
from vbon_ds.data.rewards import get_reward_function, register_reward, reward_names, vowel_ratio
from vbon_ds.engines import distributed
from vbon_ds.engines.builders import build_critic, build_reference, build_reward, lr_factor, optimizer_steps
from vbon_ds.engines.checkpoint import load_checkpoint
from vbon_ds.engines.checkpoint_layout import latest_checkpoint, step_dirs
from vbon_ds.engines.distributed import free_port
from vbon_ds.engines.policy import checkpoint_settings_ignored, finish_rollout, sampling_config
from vbon_ds.engines.reward import LastTokenReward, RewardScorer, reward_inputs
from vbon_ds.errors import VbonError
from vbon_ds.models.loading import load_reward_model, load_tokenizer
from vbon_ds.models.tiny_models import make_tiny_causal_lm, make_tiny_reward_model, make_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
EOS, PAD = 2, 0


def test_finish_rollout_masks_after_first_eos_and_pads():
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]])
    responses = torch.tensor([[5, EOS, PAD, PAD], [6, 7, 8, 9], [EOS, PAD, PAD, PAD]])
    sequences = torch.cat([torch.tensor([[PAD, 3, 4], [3, 4, 5], [4, 4, 4]]), responses], dim=1)
    rollout = finish_rollout(sequences, prompt_mask, eos_ids=[EOS], pad_id=PAD, response_length=6)
    assert rollout.prompt_length == 3
    assert rollout.response_mask.tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert rollout.ended_with_eos.tolist() == [True, False, True]
    assert rollout.responses.tolist()[1] == [6, 7, 8, 9, PAD, PAD]
    assert torch.equal(rollout.attention_mask, torch.cat([prompt_mask, rollout.response_mask], dim=1))


def _leaky_checkpoint(tmp_path: Path) -> Path:
    """A tiny LM whose generation_config.json would bend sampling away from softmax(logits / T)."""
    path = make_tiny_causal_lm(tmp_path / "leaky")
    model = AutoModelForCausalLM.from_pretrained(path)
    model.generation_config.update(
        do_sample=True,
        repetition_penalty=1.3,
        min_p=0.05,
        no_repeat_ngram_size=1,
        top_k=3,
        typical_p=0.5,
        temperature=2.0,
        suppress_tokens=[5, 6],
    )
    model.generation_config.save_pretrained(path)
    return path


@pytest.mark.parametrize("top_k", [0, 4])
def test_sampling_uses_only_our_settings(tmp_path, top_k):
    path = _leaky_checkpoint(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.generation_config.repetition_penalty == 1.3 and model.generation_config.min_p == 0.05
    tok = make_tiny_tokenizer(tmp_path / "tok")
    prompt = tok(["the movie was great and the movie"], return_tensors="pt")
    config = sampling_config(
        temperature=0.7, top_p=1.0, top_k=top_k, max_new_tokens=8, min_new_tokens=8, eos_ids=[], pad_id=0
    )
    config.update(output_scores=True, return_dict_in_generate=True)  # the processed scores, for the check

    def processed_and_wanted() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        out = model.generate(**prompt, generation_config=config)
        with torch.no_grad():
            logits = model(out.sequences).logits[:, prompt.input_ids.shape[1] - 1 : -1] / 0.7
        if top_k:  # only the top k survive, unchanged
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        return torch.stack(out.scores, dim=1), logits

    with checkpoint_settings_ignored(model):
        scores, want = processed_and_wanted()
    torch.testing.assert_close(scores, want, atol=1e-5, rtol=1e-5)
    assert model.generation_config.repetition_penalty == 1.3  # restored afterwards
    # Without the guard transformers fills the settings a call leaves unset (here suppress_tokens; in
    # transformers 4.x also those left at their defaults) from the checkpoint: the check above sees it.
    if not top_k:
        scores, want = processed_and_wanted()
        assert scores[..., 5:7].isneginf().all() and not want[..., 5:7].isneginf().any()


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


@pytest.fixture(scope="module")
def neox_reward_model(tmp_path_factory) -> Path:
    """A Pythia-style reward model: GPT-NeoX classifier, GPT-2's 50k BPE, EOS but no pad token."""
    return make_tiny_reward_model(tmp_path_factory.mktemp("rm") / "neox", "gpt_neox", tokenizer="gpt2")


def test_reward_is_read_at_the_eos_of_answers_that_ended_with_it(neox_reward_model):
    tok = load_tokenizer(str(neox_reward_model))
    assert tok.pad_token_id == tok.eos_token_id  # Pythia has no pad token: the loader pads with EOS
    classifier = load_reward_model(str(neox_reward_model), dtype=torch.float32).eval()
    classifier.config.pad_token_id = tok.pad_token_id  # as build_reward sets it
    texts = [
        "SUBREDDIT: r/cats\n\nTITLE: My cat\n\nPOST: She sleeps all day.\n\nTL;DR: a sleepy cat",
        "TL;DR: no",
    ]
    ids, mask = reward_inputs(tok, texts, [True, False])
    lengths = mask.sum(1)
    assert ids[0, lengths[0] - 1] == tok.eos_token_id and ids[1, lengths[1] - 1] != tok.eos_token_id
    assert ids[0, : lengths[0] - 1].tolist() == tok(texts[0]).input_ids and lengths[1] < lengths[0]
    caches = []
    hook = classifier.base_model.register_forward_hook(lambda m, a, out: caches.append(out.past_key_values))
    with torch.no_grad():
        scores = LastTokenReward(classifier)(ids, mask)
        hook.remove()
        hf_pooled = classifier(input_ids=ids, attention_mask=mask).logits[:, 0]
        classifier.config.pad_token_id = None  # one unpadded row: the classifier reads its last token
        want = torch.cat(
            [classifier(input_ids=ids[i : i + 1, :n]).logits[:, 0] for i, n in enumerate(lengths)]
        )
    torch.testing.assert_close(scores, want)
    assert caches == [None]  # reward (and critic) forwards build no KV cache
    # Pooling by pad id (pad == EOS) skips the appended EOS and reads the word before it.
    assert not torch.isclose(hf_pooled[0], want[0]) and torch.isclose(hf_pooled[1], want[1])


def test_collectives_without_a_process_group():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object(3) == [3]
    assert distributed.all_reduce_max(7) == 7


FROM_MAIN = """
import sys, torch.distributed as dist
from vbon_ds.engines import distributed
from vbon_ds.errors import VbonError
dist.init_process_group("gloo")
assert distributed.from_main(lambda: distributed.rank() + 41) == 41
def unusable():
    raise VbonError("no usable checkpoint")
try:
    distributed.from_main(unusable)
except VbonError as err:
    print(f"rank {distributed.rank()}: {err}", flush=True)
dist.destroy_process_group()  # gloo's threads may abort the exit otherwise ("terminate called ...")
"""


@pytest.mark.slow
def test_an_error_on_rank_0_reaches_every_rank(tmp_path):
    script = tmp_path / "from_main.py"
    script.write_text(FROM_MAIN)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, "--master_port", str(free_port()), str(script)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both ranks share torchrun's stdout, so one's line may land inside the other's
    assert sorted(re.findall(r"rank \d: [a-z ]+checkpoint", proc.stdout)) == [
        "rank 0: no usable checkpoint",
        "rank 1: no usable checkpoint",
    ]


SHARED_MEMORY = """
import glob, os, sys
from pathlib import Path
from vbon_ds.engines import distributed
distributed.init_distributed()
distributed.barrier()
segments = len(glob.glob(f"/dev/shm/*_{os.environ['MASTER_PORT']}_*"))
Path(sys.argv[1], f"rank{distributed.rank()}").write_text(str(segments))
"""


@pytest.mark.slow
def test_a_cpu_process_group_leaves_nothing_in_shared_memory(tmp_path):
    # DeepSpeed's CPU backend used to compile a shared-memory all-reduce and leave 69 MB per rank in
    # /dev/shm on every init; a test suite's worth filled the machine's memory.
    script = tmp_path / "shared_memory.py"
    script.write_text(SHARED_MEMORY)
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, "--master_port", str(port), str(script), str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["0", "0"]  # while both ranks live
    assert "shm_comm" not in proc.stdout + proc.stderr
    assert not list(Path("/dev/shm").glob(f"*_{port}_*"))


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


def run_two_ranks(script: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`script ARGS` as two ranks under torchrun, with this tree importable and one thread per rank;
    asserts it succeeded."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd = [*torchrun, "--master_port", str(free_port()), str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _run_partial_check(tmp_path: Path, mode: str) -> dict:
    make_tiny_causal_lm(
        tmp_path / "actor", "llama", n_layer=3
    )  # untied lm head: it trains with the top layer
    run_two_ranks(REPO / "tests" / "dist" / "partial_check.py", str(tmp_path), mode)

    # The export is a plain HF model (LoRA merged: no adapter weights) with the trained actor's logits.
    exported, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / f"{mode}_export", output_loading_info=True
    )
    assert not any(info.values()), info
    assert not [n for n, _ in exported.named_parameters() if "lora" in n or "base_layer" in n]
    check = torch.load(tmp_path / f"{mode}_export_check.pt")
    with torch.no_grad():
        logits = exported(input_ids=check["seq"], attention_mask=check["mask"]).logits
    torch.testing.assert_close(logits, check["logits"])
    results = json.loads((tmp_path / f"{mode}.json").read_text())

    # `vbon plan` predicts each rank's element counts exactly: partitions, persistent copies, optimizer.
    sys.path.insert(0, str(REPO / "tests" / "dist"))
    from partial_check import overrides

    plan = memory_plan(load_config(None, overrides(tmp_path, 2, mode)), world_size=2)
    assert plan.engines[0].name == "actor"
    assert results["elements"] == [plan.engines[0].elements] * 2
    return results


@pytest.mark.slow
def test_top_layers_only_under_zero3(tmp_path):
    results = _run_partial_check(tmp_path, "layers")
    assert results["trainable"] == ["lm_head.weight"] + [
        f"model.layers.2.{name}.weight"
        for name in (
            "input_layernorm", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "post_attention_layernorm",
            "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj",
        )
    ] + ["model.norm.weight"]  # fmt: skip


@pytest.mark.slow
def test_lora_under_zero3_with_the_reference_from_disabled_adapters(tmp_path):
    results = _run_partial_check(tmp_path, "lora")
    assert results["trainable"] == [
        f"model.layers.{i}.{module}.lora_{ab}.default.weight"
        for i in range(3)
        for module in ("mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj")
        for ab in "AB"
    ]
