"""The science sweep (`make gpu-science`): launch/sweep_science.yaml on one NVIDIA GPU in at most 10 minutes,
checked by its own estimate before most of the work, and its block for benchmarks/RESULTS.md.

    python benchmarks/gpu_science.py                    # one GPU: calibrate, estimate, run, write the block
    python benchmarks/gpu_science.py --estimate-only    # calibrate and estimate only
    python benchmarks/gpu_science.py --size laptop      # 2 CPU cores, scaled down (README: an estimate)
    python benchmarks/gpu_science.py --size tiny --output-dir DIR   # the tests' size: a random tiny model

1. calibrate: the sweep's own first stages, run as `vbon sweep` would (same directories, so the sweep skips
   them later): the reference cache and the first run (an on-policy one). They give the measured pieces:
   a stage's start-up (its wall time less its steps' time/step), seconds per sampled answer (time/rollout)
   and per trained answer (time/step less time/rollout) per step, and per cached answer.
2. estimate: every remaining run's steps x answers times those pieces, plus a start-up per stage, plus the
   evaluation (every policy's answers, sampled and scored once); with the time spent so far, over
   --budget seconds (600 on a GPU) it stops with exit code 3 before the other runs, unless --over-budget.
3. run: `vbon sweep` on the file (the cache and the calibration run are skipped: finished).
4. write: OUTPUT_DIR/RESULTS_block.md, with the device named, the estimate beside the measured time, the
   frontier table (frontier.md), the front counts (front_counts.md) and the figure (frontier.png).

Offline runs (BoN-SFT, BoNBoN, DPO) are estimated at two trained answers per N-subset (a chosen and a
rejected answer's log-probabilities under the actor and the reference), which over-counts BoN-SFT.
Without a CUDA device, --size gpu stops at once with exit code 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from gpu_check import require_cuda

REPO = Path(__file__).resolve().parent.parent
SWEEP_FILE = REPO / "launch" / "sweep_science.yaml"
GPU_BUDGET_S = 600.0
SIZES: dict[str, tuple[str, list[str]]] = {
    "gpu": ("smollm2", []),
    # 2 CPU cores: 96 train prompts x M = 32 cached answers, 4 steps of 16 prompts x 8 answers (128, below
    # the noise scale: a laptop cannot do a step above it in reasonable time), 32 held-out prompts x 4
    "laptop": (
        "smollm2",
        [
            "data.max_train_prompts=96",
            "data.max_eval_prompts=32",
            "vbon.num_ref_samples=32",
            "generation.batch_size=128",
            "train.steps=4",
            "train.prompts_per_step=16",
            "train.micro_batch_size=8",
            "train.lr=1e-3",
        ],
    ),
    # the tests': a random 2-layer model and the vowel-ratio reward; minutes on 2 cores
    "tiny": (
        "tiny",
        [
            "data.max_train_prompts=4",
            "data.max_eval_prompts=3",
            "data.max_prompt_tokens=64",
            "vbon.num_ref_samples=16",
            "generation.max_new_tokens=8",
            "generation.batch_size=64",
            "algo.samples_per_prompt=2",
            "algo.subsets_per_prompt=2",
            "train.steps=1",
            "train.prompts_per_step=2",
            "train.micro_batch_size=4",
            "train.lr=1e-3",
        ],
    ),
}
EVAL_OVERRIDES = {"gpu": [], "laptop": ["generation.eval_samples=4"], "tiny": ["generation.eval_samples=2"]}


@dataclass(frozen=True)
class Pieces:
    """Measured on this device: seconds per stage start-up, per sampled answer, per trained answer, per
    cached answer (sampled and scored)."""

    startup: float
    per_sampled: float
    per_trained: float
    per_cached: float


@dataclass(frozen=True)
class Work:
    """What one training run does: steps x answers sampled and trained per step."""

    steps: int
    sampled_per_step: int
    trained_per_step: int


def run_work(cfg) -> Work:
    """Answers per step of a run: K per prompt on-policy (sampled and trained ppo_epochs times); two per
    N-subset offline (nothing sampled), offline_epochs times."""
    prompts, algo = cfg.train.prompts_per_step, cfg.algo
    if algo.offline:
        return Work(cfg.train.steps, 0, prompts * algo.subsets_per_prompt * 2 * algo.offline_epochs)
    answers = prompts * algo.samples_per_prompt
    return Work(cfg.train.steps, answers, answers * algo.ppo_epochs)


def run_seconds(work: Work, pieces: Pieces) -> float:
    """One training stage: its start-up and its steps."""
    per_step = work.sampled_per_step * pieces.per_sampled + work.trained_per_step * pieces.per_trained
    return pieces.startup + work.steps * per_step


def evaluation_seconds(policies: int, answers_per_policy: int, pieces: Pieces) -> float:
    """The evaluation stage: every policy (the runs and the fresh reference) samples and scores its answers
    and computes their log-probabilities under itself and the reference (counted as one trained answer);
    the BoN rows are order statistics of the cache (negligible)."""
    return pieces.startup + policies * answers_per_policy * (pieces.per_sampled + pieces.per_trained)


def estimate_seconds(left: list[Work], policies: int, answers_per_policy: int, pieces: Pieces) -> float:
    """The remaining stages of a sweep: the runs not trained yet (`left`) and the evaluation."""
    training = sum(run_seconds(work, pieces) for work in left)
    return training + evaluation_seconds(policies, answers_per_policy, pieces)


def default_output_dir(size: str) -> Path:
    """The file's own directory on a GPU (what `vbon sweep --config launch/sweep_science.yaml` uses), else
    runs/sweep_science_SIZE."""
    return REPO / "runs" / ("sweep_science" if size == "gpu" else f"sweep_science_{size}")


def sized_sweep(size: str, output_dir: Path, path: Path) -> Path:
    """The science sweep file at `size` (its base preset and extra base overrides), in `output_dir`, its
    prompt file made absolute (the file names it from the repository root), written to `path`."""
    preset, extra = SIZES[size]
    body = yaml.safe_load(SWEEP_FILE.read_text(encoding="utf-8"))
    body["base"]["preset"] = preset
    overrides = [
        f"data.source={REPO / o.split('=', 1)[1]}" if o.startswith("data.source=") else o
        for o in body["base"].get("set", [])
    ]
    body["base"]["set"] = [*overrides, *extra]
    body["evaluate"]["set"] = [*body["evaluate"].get("set", []), *EVAL_OVERRIDES[size]]
    body["output_dir"] = str(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"


def calibrate(driver, base, configs, earlier: dict[str, float]) -> Pieces:
    """Run the cache and the first on-policy run as the sweep would, and measure the pieces from them (a
    stage finished before: its seconds from the earlier status.json, `earlier`)."""
    from vbon_ds.data.prompts import load_prompts
    from vbon_ds.errors import VbonError
    from vbon_ds.monitor import read_scalars

    def seconds(stage: str) -> float:
        ran = driver.stages.get(stage)
        return ran.seconds if ran is not None and ran.status == "done" else earlier.get(stage, 0.0)

    name, cfg = next((n, c) for n, c in configs.items() if not c.algo.offline)
    base_yaml = str(driver.root / "base.yaml")
    if not driver.cache_complete(base) and not driver.stage(
        "refcache", ["refcache", "--config", base_yaml], "reference cache"
    ):
        raise VbonError(f"gpu-science: the reference cache failed; see {driver.stages['refcache'].log}")
    if driver.finished(cfg) is None and not driver.stage(
        name, ["train", "--config", str(driver.config_path(name))], f"train {name} (calibration)"
    ):
        raise VbonError(f"gpu-science: the calibration run {name} failed; see {driver.stages[name].log}")
    scalars = read_scalars(driver.run_dir(name) / "tensorboard")
    steps = [v for _, v in scalars["time/step"]]
    rollouts = [v for _, v in scalars["time/rollout"]]
    work = run_work(cfg)
    # the first step compiles and warms up: the median of the steps is the steady state
    per_sampled = statistics.median(rollouts) / work.sampled_per_step
    per_trained = (statistics.median(steps) - statistics.median(rollouts)) / work.trained_per_step
    startup = max(seconds(name) - sum(steps), 0.0)
    prompts = len(load_prompts(base.data, "train")) + len(load_prompts(base.data, "eval"))
    per_cached = max(seconds("refcache") - startup, 0.0) / (prompts * base.vbon.num_ref_samples)
    return Pieces(startup, per_sampled, per_trained, per_cached)


def estimate_line(pieces: Pieces, spent: float, remaining: float, budget: float | None) -> str:
    total = spent + remaining
    line = (
        f"estimate: {total:.0f} s in all ({spent:.0f} s spent, {remaining:.0f} s to go), from measured "
        "pieces: "
        f"stage start-up {pieces.startup:.1f} s, {pieces.per_sampled * 1e3:.2f} ms per sampled answer, "
        f"{pieces.per_trained * 1e3:.2f} ms per trained answer, {pieces.per_cached * 1e3:.2f} ms per cached "
        "answer"
    )
    return line + (f"; budget {budget:.0f} s" if budget is not None else "")


def results_block(size: str, root: Path, estimate: str, wall: float) -> str:
    """The markdown block for benchmarks/RESULTS.md."""
    lines = [
        f"## Science sweep, size {size} ({datetime.date.today()}, {device_name()})",
        "",
        f"`python benchmarks/gpu_science.py --size {size}` (launch/sweep_science.yaml): {wall:.0f} s wall "
        f"time in all; {estimate}.",
        "",
        (root / "frontier.md").read_text(encoding="utf-8").strip(),
        "",
        "How often each method is on the Pareto front:",
        "",
        (root / "front_counts.md").read_text(encoding="utf-8").strip(),
        "",
        f"Figure: {root / 'frontier.png'}",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=SIZES, default="gpu")
    parser.add_argument("--output-dir", type=Path, help="the sweep's directory (default: the file's)")
    parser.add_argument("--estimate-only", action="store_true", help="calibrate, estimate, stop")
    parser.add_argument("--budget", type=float, help="seconds (default: 600 on a GPU, none otherwise)")
    parser.add_argument("--over-budget", action="store_true", help="run even when the estimate is over")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    if args.size == "gpu":
        require_cuda("gpu-science", ", or use --size laptop on CPU")
    from vbon_ds.commands.sweep import SweepDriver
    from vbon_ds.commands.sweep_file import load_sweep
    from vbon_ds.config import load_config
    from vbon_ds.data.prompts import load_prompts
    from vbon_ds.runlock import run_lock

    budget = args.budget if args.budget is not None else (GPU_BUDGET_S if args.size == "gpu" else None)
    root = args.output_dir.resolve() if args.output_dir else default_output_dir(args.size)
    path = sized_sweep(args.size, root, root.parent / f"{root.name}.yaml")
    sweep = load_sweep(path)
    status = sweep.output_dir / "status.json"
    earlier = json.loads(status.read_text()) if status.is_file() else {}
    with run_lock(sweep.output_dir, "gpu-science", setting="output_dir"):
        driver = SweepDriver(sweep)
        base = driver.base_config()
        configs = driver.run_configs(base)
        pieces = calibrate(driver, base, configs, {name: s["seconds"] for name, s in earlier.items()})
        left = [run_work(cfg) for cfg in configs.values() if driver.finished(cfg) is None]
        evaluation = load_config(driver.root / "base.yaml", sweep.eval_overrides).generation
        per_policy = (
            evaluation.eval_samples * len(evaluation.eval_temperatures) * len(load_prompts(base.data, "eval"))
        )
        remaining = estimate_seconds(left, len(configs) + 1, per_policy, pieces)
        estimate = estimate_line(pieces, time.monotonic() - start, remaining, budget)
    print(f"gpu-science: {estimate}", flush=True)
    if args.estimate_only:
        return 0
    if budget is not None and time.monotonic() - start + remaining > budget and not args.over_budget:
        print(
            f"gpu-science: the estimate is over the budget of {budget:.0f} s; shrink "
            "launch/sweep_science.yaml (train.steps, train.prompts_per_step) or pass --over-budget",
            file=sys.stderr,
        )
        return 3
    code = subprocess.run(
        [sys.executable, "-m", "vbon_ds", "sweep", "--config", str(path)], check=False
    ).returncode
    if code != 0:
        print(f"gpu-science: the sweep failed (exit {code}); see {sweep.output_dir}/logs", file=sys.stderr)
        return code
    block = results_block(args.size, sweep.output_dir, estimate, time.monotonic() - start)
    out = sweep.output_dir / "RESULTS_block.md"
    out.write_text(block, encoding="utf-8")
    print(block)
    print(f"gpu-science: wrote {out}; append it to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
