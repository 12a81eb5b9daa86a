"""generation.engine=vllm: the sampler's distribution and log-probs against the HF forward, weight pushes
under ZeRO-3 at 2 ranks (all weights, LoRA, top-K), the cache's fingerprint across engines, the pipeline
end to end with a SIGKILL and resume, the one-line errors, and the tensor-parallel groups made once. The
engines run in subprocesses (vLLM starts inside the job's process group; the pytest process keeps none)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_pipeline import (
    assert_same_final_weights,
    kill_at_first_checkpoint_then_resume,
    read_scalars,
    tiny_config_file,
    vbon,
)

from vbon_ds.config import load_config
from vbon_ds.data.refcache_fingerprint import fingerprint_from_config
from vbon_ds.engines import distributed
from vbon_ds.engines.distributed import free_port
from vbon_ds.errors import VbonError
from vbon_ds.models.sampler_choice import resolved_engine, vllm_installed
from vbon_ds.models.tiny_models import make_tiny_causal_lm

REPO = Path(__file__).resolve().parent.parent
needs_vllm = pytest.mark.skipif(
    not vllm_installed(), reason="vLLM is not installed (launch/setup_env.sh vllm)"
)


def run_check(workdir: Path, *args: str, ranks: int = 1) -> None:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            str(free_port()),
        ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, str(REPO / "tests" / "dist" / "vllm_check.py"), str(workdir), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_a_missing_vllm_is_one_line_naming_the_install(monkeypatch):
    from vbon_ds.engines.vllm_sampler import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm then raises ImportError
    with pytest.raises(VbonError, match=r"vLLM cannot be imported .*pip install -e '\.\[vllm\]'") as err:
        import_vllm()
    assert "\n" not in str(err.value)


def test_auto_takes_hf_on_cpu_and_the_named_engine_otherwise():
    gen = load_config(None, []).generation
    assert gen.engine == "auto" and resolved_engine(gen) == (
        "vllm" if torch.cuda.is_available() and vllm_installed() else "hf"
    )
    for engine in ("hf", "vllm"):
        assert resolved_engine(load_config(None, [f"generation.engine={engine}"]).generation) == engine


def test_a_cache_serves_either_engine_only_at_the_same_sampling_precision():
    # Both engines sample softmax(logits / T) of the same weights: a cache from one is the other's as
    # long as the logits are computed in the same precision; a bf16 vLLM samples another policy.
    def fingerprint(*overrides: str) -> dict:
        return fingerprint_from_config(
            load_config(None, ["model.actor=m", "model.dtype=float32", *overrides])
        )

    hf, vllm_fp32 = fingerprint("generation.engine=hf"), fingerprint("generation.engine=vllm")
    assert hf == vllm_fp32 and hf["sampling_precision"] == "float32"
    bf16 = fingerprint("generation.engine=vllm", "generation.vllm_dtype=bfloat16")
    assert {k for k in hf if hf[k] != bf16[k]} == {"sampling_precision"}
    # vllm_dtype is vLLM's: the HF sampler computes in model.dtype whatever it says.
    assert fingerprint("generation.engine=hf", "generation.vllm_dtype=bfloat16") == hf


@needs_vllm
@pytest.mark.slow
def test_vllm_samples_softmax_over_temperature(tmp_path):
    # A GPT-NeoX (Pythia) shape whose head is scaled up: a peaked next-token distribution, so that a
    # chi-square test over its likely tokens has power. 3000 first tokens of one prompt.
    from transformers import AutoModelForCausalLM

    actor = make_tiny_causal_lm(tmp_path / "actor", "gpt_neox", width=128)
    model = AutoModelForCausalLM.from_pretrained(actor)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(12.0)
    model.save_pretrained(actor)
    samples = 3000
    run_check(tmp_path, f"first_token={samples}")
    result = json.loads((tmp_path / "first_token.json").read_text())
    assert result["logprob_gap"] < 1e-4  # vLLM's log-probs of its answers are the fp32 HF forward's
    counts, probs = torch.tensor(result["counts"]), torch.tensor(result["probs"], dtype=torch.float64)
    expected = samples * probs
    likely = expected >= 5  # bins of the likely tokens, the rest pooled into one
    observed = torch.cat([counts[likely], counts[~likely].sum()[None]])
    wanted = torch.cat([expected[likely], expected[~likely].sum()[None]])
    assert likely.sum() >= 5 and wanted[-1] >= 5
    chi2 = ((observed - wanted) ** 2 / wanted).sum()
    dof = len(observed) - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2), chi2 / 2).item()
    assert p_value > 1e-3, (chi2.item(), dof)
    print(f"chi2 {chi2.item():.1f} on {dof} degrees of freedom, p = {p_value:.3f}")
    # The test can fail: the same counts against softmax(logits / 0.7) instead of / 0.9 are rejected.
    other = torch.softmax(torch.log(probs) * 0.9 / 0.7, -1) * samples
    other_wanted = torch.cat([other[likely], other[~likely].sum()[None]])
    other_chi2 = ((observed - other_wanted) ** 2 / other_wanted).sum()
    assert torch.special.gammaincc(torch.tensor(dof / 2), other_chi2 / 2).item() < 1e-6


@needs_vllm
@pytest.mark.slow
def test_vllm_follows_the_actor_under_zero3_with_all_weights_lora_top_k_and_tensor_parallel(tmp_path):
    # tp: the 2 ranks share one engine (vllm_tensor_parallel_size=2), each with its own prompts (2 and 3).
    # Its lm head is its input embeddings (as SmolLM2's): pushed only through them, and trained in "full".
    make_tiny_causal_lm(
        tmp_path / "actor", "llama", width=128, config_overrides={"tie_word_embeddings": True}
    )
    run_check(tmp_path, "full", "lora", "top", ranks=2)
    results = json.loads((tmp_path / "results.json").read_text())
    run_check(tmp_path, "tp", ranks=2)  # a process's vLLM engines share one tensor-parallel size
    results |= json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["tp"]["one_tp_group"]  # the reference's sampler reused the actor's group of size 2
    for variant in ("full", "lora", "top", "tp"):
        result = results[variant]
        # vLLM's log-probs of its own samples are the engines' fp32 forward, before and after the steps.
        for gap in ("actor_before", "reference_before", "actor_after", "reference_after"):
            assert result[gap] < 1e-4, (variant, gap, result[gap])
        assert result["actor_change"] > 0.1, variant  # the steps moved the actor: a push was needed
        assert result["sync_seconds"] > 0
    # Top-K pushes only what trains: the top block (9 tensors) and the final norm (the tied head is frozen).
    assert results["top"]["blocks_pushed_after"] == 10
    assert results["full"]["blocks_pushed_after"] == results["full"]["weights_pushed_first"] // 2


@pytest.fixture(scope="module")
def zero3_forced(tmp_path_factory) -> dict:
    """The zero3_forced check's results, a world of one (one launch for the tests that read them)."""
    workdir = tmp_path_factory.mktemp("zero3_forced")
    make_tiny_causal_lm(workdir / "actor", "gpt_neox", width=64, heads=2)
    run_check(workdir, "zero3_forced")
    return json.loads((workdir / "results.json").read_text())["zero3_forced"]


@needs_vllm
@pytest.mark.slow
def test_vllm_builds_a_transformers_backend_model_beside_zero3_engines(zero3_forced):
    # vLLM serves GPT-NeoX (Pythia) through transformers' from_config, which the engines' live ZeRO-3 config
    # would turn into a deepspeed.zero.Init partitioning of vLLM's meta tensors.
    for gap in ("actor_before", "reference_before", "actor_after", "reference_after"):
        assert zero3_forced[gap] < 1e-4, (gap, zero3_forced[gap])
    assert zero3_forced["actor_change"] > 0.1 and zero3_forced["sync_seconds"] > 0


@needs_vllm
@pytest.mark.slow
def test_vllm_refuses_answers_and_prompts_longer_than_its_engine_was_started_for(zero3_forced):
    # The engine's max_model_len is data.max_prompt_tokens (32) + generation.max_new_tokens (8) at its start:
    # a 9-token answer, or a 33-token prompt (which vLLM would take, cutting its answer short), is refused.
    started = "the vLLM engine was started for"
    assert zero3_forced["refused"] == [
        f"generation.max_new_tokens: {started} answers of at most 8 tokens, asked for 9",
        f"data.max_prompt_tokens: {started} prompts of at most 32 tokens, given one of 33",
    ]


@needs_vllm
@pytest.mark.slow
def test_pipeline_with_vllm_resumes_after_sigkill_to_the_same_weights(tmp_path):
    # refcache + RLOO + evaluate on the tiny preset, every answer sampled by vLLM; a run killed after its
    # first checkpoint resumes (seeds from the restored torch streams, weights pushed again) to the
    # weights of the run that was not killed.
    run = ("generation.engine=vllm", "train.steps=4", "train.checkpoint_every=2")
    straight = tiny_config_file(tmp_path, "straight", *run)
    vbon("refcache", "--config", str(straight))
    vbon("train", "--config", str(straight))
    scalars = read_scalars(tmp_path / "straight" / "tensorboard")
    assert [step for step, _ in scalars["time/weight_sync"]] == [1, 2, 3, 4]
    evaluated = vbon("evaluate", "--config", str(straight))
    assert "| policy |" in evaluated.stdout

    killed = tiny_config_file(tmp_path, "killed", *run)
    vbon("refcache", "--config", str(killed))
    kill_at_first_checkpoint_then_resume(killed, tmp_path / "killed", step=2)
    assert_same_final_weights(tmp_path / "straight", tmp_path / "killed")

    # The HF sampler accepts the vLLM cache (same fp32 distribution) and finds nothing left to sample;
    # a bf16 vLLM sampler does not.
    hf = tiny_config_file(tmp_path, "straight", "generation.engine=hf")
    assert "refcache: 48 prompts" in vbon("refcache", "--config", str(hf)).stdout
    bf16 = tiny_config_file(tmp_path, "straight", "generation.engine=vllm", "generation.vllm_dtype=bfloat16")
    refused = vbon("refcache", "--config", str(bf16), check=False)
    assert (
        refused.returncode == 2 and "sampling_precision: cached 'float32', now 'bfloat16'" in refused.stderr
    )


def test_engines_are_reused_once_their_sampler_is_gone_and_share_one_parallel_size(monkeypatch):
    from vbon_ds.engines import vllm_sampler

    class Owner:  # stands for a VllmSampler (only its lifetime matters)
        pass

    monkeypatch.setattr(vllm_sampler, "_POOL", [])
    started = []

    def start() -> object:
        started.append(object())
        return started[-1]

    settings = {"model": "{}", "tensor_parallel_size": 1}
    first = Owner()
    engine = vllm_sampler._pooled_engine(first, settings, start)
    second = Owner()
    assert vllm_sampler._pooled_engine(second, settings, start) is not engine  # the first is in use
    del first
    assert vllm_sampler._pooled_engine(Owner(), settings, start) is engine  # its sampler is gone
    assert len(started) == 2
    with pytest.raises(
        VbonError, match=r"vllm_tensor_parallel_size: 2, but this process already runs vLLM engines of size 1"
    ):
        vllm_sampler._pooled_engine(Owner(), {**settings, "tensor_parallel_size": 2}, start)


def test_tensor_parallel_groups_are_made_once_per_size_and_default_group(monkeypatch):
    # Rank 3 of 4 on one node; new_group records the ranks of each group it is asked to make.
    made = []
    fake = SimpleNamespace(
        group=SimpleNamespace(WORLD=object()),
        new_group=lambda ranks: made.append(ranks) or tuple(ranks),
        is_initialized=lambda: True,
        get_world_size=lambda: 4,
        get_rank=lambda: 3,
    )
    monkeypatch.setattr(distributed, "dist", fake)
    monkeypatch.setattr(distributed, "_TP_GROUPS", {})
    monkeypatch.setenv("LOCAL_SIZE", "4")
    assert distributed.tensor_parallel_group(1) is None and made == []
    group = distributed.tensor_parallel_group(2)
    assert group == (2, 3) and made == [[0, 1], [2, 3]]  # every group, made by every rank
    assert distributed.tensor_parallel_group(2) is group and len(made) == 2  # e.g. the next VllmSampler
    assert distributed.tensor_parallel_group(4) == (0, 1, 2, 3) and len(made) == 3
    assert distributed.tensor_parallel_group(2) is group and len(made) == 3
    fake.group.WORLD = object()  # the default group destroyed and made again: its groups went with it
    again = distributed.tensor_parallel_group(2)
    assert again == group and again is not group and made[3:] == [[0, 1], [2, 3]]
