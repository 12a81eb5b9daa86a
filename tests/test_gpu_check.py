"""benchmarks/gpu_check.py on a machine without a GPU: it stops at once with a clear message; the parts that
need no GPU (the Pythia-1B shape, the run's config, its memory plan) are checked here."""

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
    args = gpu_check.parse_args(["--only", "model", "--only", "kernels", "--steps", "2"])
    assert (args.only, args.steps) == (["model", "kernels"], 2)
    assert gpu_check.parse_args([]).only is None
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "everything"])


def test_the_model_check_is_pythia_1b_shaped_and_fits_one_card(tmp_path):
    config = gpu_check.pythia_1b_config(eos_id=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 1_011_781_632  # EleutherAI/pythia-1b
    config.save_pretrained(tmp_path / "actor")  # the plan reads configs only
    config.num_labels = 1
    config.save_pretrained(tmp_path / "reward")
    cfg = load_config(None, gpu_check.model_check_overrides(tmp_path, steps=3))
    assert batch_sizes(cfg, 1).gradient_accumulation_steps == 2
    plan = memory_plan(cfg, world_size=1)
    assert [e.name for e in plan.engines] == ["actor", "critic", "reference", "reward"]
    assert plan.fits()
