"""Every recipe in launch/ loads, passes the batch arithmetic and fits 80 GB cards (`vbon plan`) at each
world size its `# world sizes:` comment names; the TL;DR recipes of one model size share a reference cache,
which holds only the training prompts a run draws, as many as their comments and the README say."""

import re
from pathlib import Path

import huggingface_hub.constants
import pytest

from vbon_ds.algorithms.registry import training_memory_plan as memory_plan
from vbon_ds.algorithms.work_plan import cache_line, format_work, work_plan
from vbon_ds.batching import batch_sizes
from vbon_ds.config import load_config
from vbon_ds.data.refcache import refcache_dir
from vbon_ds.data.refcache_fingerprint import fingerprint_from_config
from vbon_ds.engines.memory_plan import format_plan

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
RECIPES = sorted(p for p in LAUNCH.glob("*.yaml") if not p.name.startswith("sweep_"))  # sweeps: test_cli
TLDR = sorted(LAUNCH.glob("tldr_*.yaml"))
README = LAUNCH.parent / "README.md"


def world_sizes(recipe: Path) -> list[int]:
    found = re.search(r"^# world sizes: ([\d ]+)$", recipe.read_text(), re.MULTILINE)
    assert found, f"{recipe.name}: no '# world sizes: ...' comment naming the GPU counts it runs on"
    return [int(w) for w in found.group(1).split()]


@pytest.fixture
def offline(monkeypatch):
    """No hub here: the Pythia shapes come from vbon plan's built-in table, at once (no retries)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_recipes_exist_for_each_pythia_size():
    actors = {load_config(r).model.actor for r in RECIPES}
    for size in ("1b", "2.8b", "6.9b"):
        assert f"cleanrl/EleutherAI_pythia-{size}-deduped__sft__tldr" in actors


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_runs_and_fits_at_each_world_size(recipe, offline):
    cfg = load_config(recipe)
    for world in world_sizes(recipe):
        sizes = batch_sizes(cfg, world)  # raises when a field does not divide
        # Every answer of a step lands in exactly one micro-batch of one rank in each epoch.
        per_step = sizes.micro_batch_per_rank * sizes.gradient_accumulation_steps * world
        assert per_step * cfg.algo.num_minibatches == cfg.train.prompts_per_step * cfg.algo.items_per_prompt
        plan = memory_plan(cfg, world)
        assert plan.fits(), format_plan(plan)


def test_tldr_vbon_and_kl_rl_share_the_reference_cache():
    vbon, kl_rl = load_config(LAUNCH / "tldr_vbon.yaml"), load_config(LAUNCH / "tldr_kl_rl.yaml")
    assert (vbon.vbon.objective, kl_rl.vbon.objective) == ("vbon", "kl_rl")
    assert vbon.train.output_dir != kl_rl.train.output_dir
    assert refcache_dir(vbon) == refcache_dir(kl_rl)
    assert fingerprint_from_config(vbon) == fingerprint_from_config(kl_rl)


@pytest.mark.parametrize("recipe", TLDR, ids=lambda p: p.name)
def test_tldr_cache_holds_only_prompts_the_run_draws_as_its_text_says(recipe):
    cfg = load_config(recipe)
    draws = cfg.train.steps * cfg.train.prompts_per_step
    assert 0 < cfg.data.max_train_prompts <= draws
    work = work_plan(cfg)  # the hub data set is not read: the caps
    assert work.train.count == cfg.data.max_train_prompts and not work.notes
    assert f"# `vbon plan` {cache_line(work)}\n" in recipe.read_text()
    # The README's cache cost table holds `vbon plan`'s row for this recipe (8 GPUs, the default rate).
    rows = format_work(work, 8, None).splitlines()
    assert next(r for r in rows if r.startswith("| reference cache")) in README.read_text()
