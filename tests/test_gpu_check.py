"""benchmarks/gpu_check.py on a machine without a GPU: it stops at once with a clear message; the parts that
need no GPU (the Pythia-1B shape, the run's config, its memory plan with the sampler's share, the vLLM
benchmark's command line) are checked here."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from vbon_ds.algorithms.registry import training_memory_plan as memory_plan
from vbon_ds.batching import batch_sizes
from vbon_ds.config import load_config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import generation  # noqa: E402
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
@pytest.mark.parametrize("script, tool", [("gpu_check.py", "gpu-check"), ("gpu_science.py", "gpu-science")])
def test_stops_at_once_without_cuda(script, tool):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"{tool}: no CUDA device (torch.cuda.is_available() is False" in proc.stderr
    assert proc.stdout == ""


def test_arguments():
    args = gpu_check.parse_args(["--only", "model", "--only", "vllm", "--steps", "2", "--engine", "hf"])
    assert (args.only, args.steps, args.engine) == (["model", "vllm"], 2, "hf")
    assert (gpu_check.parse_args([]).only, gpu_check.parse_args([]).engine) == (None, "vllm")
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "everything"])


def pythia_configs(tmp_path: Path):
    """The Pythia-1B-shaped actor and reward configs the model check writes (the plan reads configs only)."""
    config = gpu_check.pythia_1b_config(eos_id=0)
    config.save_pretrained(tmp_path / "actor")
    config.num_labels = 1
    config.save_pretrained(tmp_path / "reward")


def test_the_model_check_is_pythia_1b_shaped_and_fits_one_card(tmp_path):
    config = gpu_check.pythia_1b_config(eos_id=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 1_011_781_632  # EleutherAI/pythia-1b
    pythia_configs(tmp_path)
    cfg = load_config(None, gpu_check.model_check_overrides(tmp_path, steps=3))
    assert batch_sizes(cfg, 1).gradient_accumulation_steps == 2
    plan = memory_plan(cfg, world_size=1)
    assert [e.name for e in plan.engines] == ["actor", "critic", "reference", "reward"]
    assert plan.fits()


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_the_plan_beside_the_measurement_assumes_the_runs_sampler_and_card(tmp_path, engine):
    # generation.engine is named in the run's config (auto would follow the machine the plan is made on).
    pythia_configs(tmp_path)
    cfg = load_config(None, gpu_check.model_check_overrides(tmp_path, steps=3, engine=engine))
    assert cfg.generation.engine == engine
    plan = memory_plan(cfg, world_size=1, gpu_memory_gb=141)
    assert (plan.sampler, plan.vllm > 0, plan.gpu_memory_gb) == (engine, engine == "vllm", 141)
    line = gpu_check.plan_line(cfg, 141)
    assert line.startswith(f"`vbon plan` for this config at world size 1 ({engine} sampler): ")
    assert line.endswith(": fits a 141 GB card.") and ("of which vLLM" in line) == (engine == "vllm")
    assert "does NOT fit a 8 GB card." in gpu_check.plan_line(cfg, 8)


def test_the_vllm_part_runs_the_generation_benchmark_on_the_pythia_model_under_zero3(tmp_path):
    command = gpu_check.vllm_benchmark_command(tmp_path, tmp_path / "generation.md")
    assert command[:2] == [sys.executable, "benchmarks/generation.py"]
    args = generation.parse_args(command[2:])
    assert (args.compare, args.model, args.dtypes, args.scale) == (
        "engines",
        str(tmp_path / "actor"),
        ["bfloat16"],
        8,
    )
    assert "deepspeed.force_stage=true" in args.set and args.out == tmp_path / "generation.md"
    assert (args.new_tokens, args.repeats) == (24, 2)
