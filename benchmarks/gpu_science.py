"""The science sweep (`make gpu-science`): launch/sweep_science.yaml on one NVIDIA GPU in at most 10 minutes,
sized by its own measurements on the card, and its block for benchmarks/RESULTS.md.

    python benchmarks/gpu_science.py                    # one GPU: measure, fit, run, write the block
    python benchmarks/gpu_science.py --estimate-only    # measure and fit only
    python benchmarks/gpu_science.py --size laptop      # 2 CPU cores, scaled down (40 minutes)
    python benchmarks/gpu_science.py --size tiny --output-dir DIR   # the tests' size: a random tiny model

1. cache: the sweep's reference cache (the sweep skips it later: complete).
2. noise: the gradient noise scale B_noise of the weights a run trains, at pi_ref, from the cache's answers
   (benchmarks/gradient_noise.py); the answers per step are raised to at least B_noise (more prompts per
   step, up to the training set), so every on-policy step is at least as much signal as noise.
3. probe: `parallel` copies of the first on-policy run, a few steps each, side by side as the sweep will
   run them, in OUTPUT_DIR/probe/. They give the measured pieces: a stage's start-up (its wall time less
   its steps' time/step), seconds per sampled answer (time/rollout) and per trained answer (time/step less
   time/rollout) per step, with `parallel` runs sharing the device.
4. fit: the most steps (the same for every run, within the size's range) whose estimate fits the budget:
   the time spent so far, the training runs `parallel` at a time (each its start-up plus steps x answers x
   the pieces, scheduled as the sweep schedules them), and the evaluation (every policy's answers, sampled
   and scored once). None fits: exit 3 before the runs, unless --over-budget (then the fewest steps).
   The choice goes to OUTPUT_DIR/fit.json, which a rerun reuses (so a resumed sweep keeps its steps).
5. run: `vbon sweep` on the fitted file (the cache is skipped: complete).
6. write: OUTPUT_DIR/RESULTS_block.md, with the device named, the noise scale, the fit, the estimate beside
   the measured time, the frontier table (frontier.md), the front counts (front_counts.md) and the figure.

Offline runs (BoN-SFT, BoNBoN, DPO) are estimated at two trained answers per N-subset (a chosen and a
rejected answer's log-probabilities under the actor and the reference), which over-counts BoN-SFT.
Without a CUDA device, --size gpu stops at once with exit code 2.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import heapq
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from gpu_check import require_cuda

REPO = Path(__file__).resolve().parent.parent
SWEEP_FILE = REPO / "launch" / "sweep_science.yaml"


@dataclass(frozen=True)
class Size:
    """One scale of the science sweep: the base preset and overrides, and how it is measured and fitted."""

    preset: str
    overrides: list[str]
    eval_overrides: list[str]
    budget: float | None
    """Seconds for the whole command (None: no budget, the most steps)."""
    parallel: int
    """Training runs at once (the sweep file's `parallel`)."""
    noise_prompts: int
    """Training prompts whose cached answers measure the noise scale (0: not measured)."""
    probe_steps: int
    steps: tuple[int, int]
    """The fewest and the most steps a fit may choose."""


SIZES: dict[str, Size] = {
    # one GPU: the file as written, 4 runs at once (the file's `parallel`), 128 x 8 answers for B_noise
    "gpu": Size("smollm2", [], [], 600.0, 4, 128, 3, (8, 100)),
    # 2 CPU cores: 64 train prompts x M = 16 cached answers, 8 prompts x 8 answers per step (far below the
    # noise scale: a laptop cannot do a step above it in reasonable time), 16 held-out prompts x 4; 40 minutes
    "laptop": Size(
        "smollm2",
        [
            "data.max_train_prompts=64",
            "data.max_eval_prompts=16",
            "vbon.num_ref_samples=16",
            "generation.batch_size=128",
            "train.prompts_per_step=8",
            "train.micro_batch_size=8",
            "train.lr=1e-3",
        ],
        ["generation.eval_samples=4"],
        2400.0,
        1,
        0,
        2,
        (2, 24),
    ),
    # the tests': a random 2-layer model and the vowel-ratio reward, 2 runs at once; minutes on 2 cores
    "tiny": Size(
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
            "train.prompts_per_step=2",
            "train.micro_batch_size=4",
            "train.lr=1e-3",
        ],
        ["generation.eval_samples=2"],
        3600.0,
        2,
        2,
        2,
        (1, 1),
    ),
}


@dataclass(frozen=True)
class Pieces:
    """Measured on this device: seconds per stage start-up, per sampled answer, per trained answer, and per
    cached answer (sampled and scored; None when the cache was made earlier)."""

    startup: float
    per_sampled: float
    per_trained: float
    per_cached: float | None


@dataclass(frozen=True)
class StepWork:
    """What one step of a run does: answers sampled and answers trained (forward and backward)."""

    sampled: int
    trained: int


@dataclass(frozen=True)
class Fit:
    """What the fit chose, from what it measured; fit.json."""

    sweep_digest: str
    """SHA-256 of the sized sweep file the fit was made for."""
    pieces: Pieces
    noise_scale: float | None
    """B_noise of the trained weights in answers (None: not measured, or no signal seen)."""
    noise_answers: int
    answers_per_prompt: int
    prompts_per_step: int
    steps: int
    estimate: float
    """Seconds, the whole command, by the estimate."""
    spent: float
    """Seconds spent when the fit was made (cache, noise, probe)."""
    budget: float | None
    """The budget the steps were fitted to."""
    fits: bool


def step_work(cfg, prompts_per_step: int | None = None) -> StepWork:
    """Answers of one step: K per prompt on-policy (sampled once, trained ppo_epochs times); two per N-subset
    offline (nothing sampled), offline_epochs times."""
    prompts, algo = prompts_per_step or cfg.train.prompts_per_step, cfg.algo
    if algo.offline:
        return StepWork(0, prompts * algo.subsets_per_prompt * 2 * algo.offline_epochs)
    answers = prompts * algo.samples_per_prompt
    return StepWork(answers, answers * algo.ppo_epochs)


def run_seconds(work: StepWork, steps: int, pieces: Pieces) -> float:
    """One training stage: its start-up and its steps."""
    return pieces.startup + steps * (work.sampled * pieces.per_sampled + work.trained * pieces.per_trained)


def makespan(durations: list[float], parallel: int) -> float:
    """Wall time of stages run `parallel` at a time in this order, each starting when a slot frees (as
    `vbon sweep` schedules its runs)."""
    slots = [0.0] * max(1, min(parallel, len(durations)))
    for duration in durations:
        heapq.heappush(slots, heapq.heappop(slots) + duration)
    return max(slots)


def evaluation_seconds(policies: int, answers_per_policy: int, pieces: Pieces) -> float:
    """The evaluation stage: every policy (the runs and the fresh reference) samples and scores its answers
    and computes their log-probabilities under itself and the reference (counted as one trained answer);
    the BoN rows are order statistics of the cache (negligible)."""
    return pieces.startup + policies * answers_per_policy * (pieces.per_sampled + pieces.per_trained)


def remaining_seconds(
    runs: list[StepWork], steps: int, parallel: int, policies: int, answers_per_policy: int, pieces: Pieces
) -> float:
    """The stages still to run: the training runs (`runs`, `steps` each) and the evaluation."""
    training = makespan([run_seconds(work, steps, pieces) for work in runs], parallel)
    return training + evaluation_seconds(policies, answers_per_policy, pieces)


def fit_steps(budget: float | None, spent: float, steps: tuple[int, int], seconds_at) -> int | None:
    """The most steps in the range [fewest, most] with spent + seconds_at(steps) within the budget (the most
    without a budget); None when even the fewest do not fit."""
    fewest, most = steps
    return next(
        (n for n in range(most, fewest - 1, -1) if budget is None or spent + seconds_at(n) <= budget), None
    )


def prompts_for_noise(noise: float | None, answers_per_prompt: int, planned: int, available: int) -> int:
    """Prompts per step: the planned number, raised so the step's answers reach the noise scale, at most
    every training prompt."""
    needed = math.ceil(noise / answers_per_prompt) if noise is not None else 0
    return min(max(planned, needed), available)


def default_output_dir(size: str) -> Path:
    """The file's own directory on a GPU (what `vbon sweep --config launch/sweep_science.yaml` uses), else
    runs/sweep_science_SIZE."""
    return REPO / "runs" / ("sweep_science" if size == "gpu" else f"sweep_science_{size}")


def sized_sweep(size: str, output_dir: Path, path: Path, fitted: list[str] = ()) -> Path:
    """The science sweep file at `size` (its base preset, overrides and parallelism) plus the fit's
    overrides, in `output_dir`, its prompt file made absolute (the file names it from the repository root),
    written to `path`."""
    chosen = SIZES[size]
    body = yaml.safe_load(SWEEP_FILE.read_text(encoding="utf-8"))
    body["base"]["preset"] = chosen.preset
    overrides = [
        f"data.source={REPO / o.split('=', 1)[1]}" if o.startswith("data.source=") else o
        for o in body["base"].get("set", [])
    ]
    body["base"]["set"] = [*overrides, *chosen.overrides, *fitted]
    body["evaluate"]["set"] = [*body["evaluate"].get("set", []), *chosen.eval_overrides]
    body["output_dir"] = str(output_dir)
    body["parallel"] = chosen.parallel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"


def measure_noise(base, prompts: int) -> tuple[float | None, int, list[str]]:
    """B_noise of the weights a run trains (LoRA adapters at their start, or the top layers, or all) at
    pi_ref, in float32 on the device; with its answers and its report table."""
    import gradient_noise
    import torch

    from vbon_ds.models.adapters import apply_trainable_subset
    from vbon_ds.models.loading import load_causal_lm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_causal_lm(base.model.actor, dtype=torch.float32, gguf_file=base.model.gguf_file).to(device)
    apply_trainable_subset(model, base.model, base.train.seed, lora=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    what = f"trained weights ({sum(p.numel() for p in trained):,})"
    scale = gradient_noise.measure(base, model, {what: trained}, prompts)[what]
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return scale.scale, scale.answers, gradient_noise.report_lines({what: scale})


def probe(driver, cfg, name: str, copies: int, steps: int, prompts_per_step: int) -> list[dict]:
    """`copies` runs of `cfg` for `steps` steps side by side in OUTPUT_DIR/probe/; their stage seconds and
    steady-state step and rollout seconds (the median: the first step warms up)."""
    from vbon_ds.config import dump_config, load_config
    from vbon_ds.errors import VbonError
    from vbon_ds.monitor import read_scalars

    root = driver.root / "probe"
    shutil.rmtree(root, ignore_errors=True)  # a probe never resumes an earlier one
    jobs = []
    for i in range(copies):
        out, path = root / "runs" / f"{name}_{i}", root / "configs" / f"{name}_{i}.yaml"
        probed = load_config(
            driver.config_path(name),
            [f"train.steps={steps}", f"train.prompts_per_step={prompts_per_step}", f"train.output_dir={out}"],
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump_config(probed), encoding="utf-8")
        jobs.append((f"probe_{i}", ["train", "--config", str(path)], f"probe {i + 1}/{copies}: {name}"))
    ok = driver.run_stages(jobs, copies)
    failed = [job for job, succeeded in ok.items() if not succeeded]
    if failed:
        raise VbonError(f"gpu-science: the probe failed; see {driver.stages[failed[0]].log}")
    measured = []
    for i, (stage, _, _) in enumerate(jobs):
        scalars = read_scalars(root / "runs" / f"{name}_{i}" / "tensorboard")
        step_times = [v for _, v in scalars["time/step"]]
        measured.append(
            {
                "seconds": driver.stages[stage].seconds,
                "steps": sum(step_times),
                "step": statistics.median(step_times),
                "rollout": statistics.median(v for _, v in scalars["time/rollout"]),
            }
        )
    return measured


def pieces_from(probes: list[dict], work: StepWork, cache_seconds: float | None, cached: int) -> Pieces:
    """The pieces from the probes (the median over the copies) and the cache stage's seconds."""
    startup = statistics.median(max(p["seconds"] - p["steps"], 0.0) for p in probes)
    rollout = statistics.median(p["rollout"] for p in probes)
    step = statistics.median(p["step"] for p in probes)
    per_cached = max(cache_seconds - startup, 0.0) / cached if cache_seconds is not None else None
    return Pieces(startup, rollout / work.sampled, (step - rollout) / work.trained, per_cached)


def estimate_line(fit: Fit, budget: float | None) -> str:
    p = fit.pieces
    cached = f", {p.per_cached * 1e3:.2f} ms per cached answer" if p.per_cached is not None else ""
    line = (
        f"estimate: {fit.estimate:.0f} s in all ({fit.spent:.0f} s spent on the cache, the noise scale and "
        f"the probe), {fit.steps} steps of {fit.prompts_per_step} prompts per run, from measured pieces: "
        f"stage start-up {p.startup:.1f} s, {p.per_sampled * 1e3:.2f} ms per sampled answer, "
        f"{p.per_trained * 1e3:.2f} ms per trained answer{cached}"
    )
    return line + (f"; budget {budget:.0f} s" if budget is not None else "")


def noise_line(fit: Fit, noise_table: list[str]) -> str:
    if fit.noise_answers == 0:
        return "Gradient noise scale: not measured at this size."
    scale = f"{fit.noise_scale:.0f} answers" if fit.noise_scale is not None else "not seen (no signal)"
    answers = fit.prompts_per_step * fit.answers_per_prompt
    table = "\n".join(noise_table)
    return (
        f"Gradient noise scale of the trained weights at pi_ref, from {fit.noise_answers} cached answers: "
        f"B_noise = {scale}; each on-policy step has {fit.prompts_per_step} x {fit.answers_per_prompt} = "
        f"{answers} answers.\n\n{table}"
    )


def results_block(size: str, root: Path, estimate: str, noise: str, wall: float) -> str:
    """The markdown block for benchmarks/RESULTS.md."""
    lines = [
        f"## Science sweep, size {size} ({datetime.date.today()}, {device_name()})",
        "",
        f"`python benchmarks/gpu_science.py --size {size}` (launch/sweep_science.yaml, "
        f"runs {SIZES[size].parallel} at a time): {wall:.0f} s wall time in all; {estimate}.",
        "",
        noise,
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
    parser.add_argument("--estimate-only", action="store_true", help="measure and fit, then stop")
    parser.add_argument("--budget", type=float, help="seconds (default: the size's; 600 on a GPU)")
    parser.add_argument("--over-budget", action="store_true", help="run the fewest steps when none fit")
    return parser.parse_args(argv)


def calibrate(driver, size: Size, budget: float | None, start: float, digest: str) -> tuple[Fit, list[str]]:
    """Cache, noise scale, probe and fit (module docstring, steps 1-4); the fit and the noise table."""
    from vbon_ds.config import load_config
    from vbon_ds.data.prompts import load_prompts
    from vbon_ds.errors import VbonError

    base = driver.base_config()
    configs = driver.run_configs(base)
    if (
        not driver.cache_complete(base)
        and not driver.run_stages(
            [("refcache", ["refcache", "--config", str(driver.root / "base.yaml")], "reference cache")], 1
        )["refcache"]
    ):
        raise VbonError(f"gpu-science: the reference cache failed; see {driver.stages['refcache'].log}")
    noise, noise_answers, noise_table = (
        measure_noise(base, size.noise_prompts) if size.noise_prompts else (None, 0, [])
    )
    train, held_out = len(load_prompts(base.data, "train")), len(load_prompts(base.data, "eval"))
    prompts = prompts_for_noise(noise, base.algo.samples_per_prompt, base.train.prompts_per_step, train)
    name, first = next((n, c) for n, c in configs.items() if not c.algo.offline)
    probes = probe(driver, first, name, size.parallel, size.probe_steps, prompts)
    ran = driver.stages.get("refcache")
    pieces = pieces_from(
        probes,
        step_work(first, prompts),
        ran.seconds if ran is not None else None,
        (train + held_out) * base.vbon.num_ref_samples,
    )
    evaluation = load_config(driver.root / "base.yaml", driver.sweep.eval_overrides).generation
    per_policy = evaluation.eval_samples * len(evaluation.eval_temperatures) * held_out
    runs = [step_work(cfg, prompts) for cfg in configs.values()]
    spent = time.monotonic() - start

    def seconds_at(steps: int) -> float:
        return remaining_seconds(runs, steps, size.parallel, len(configs) + 1, per_policy, pieces)

    steps = fit_steps(budget, spent, size.steps, seconds_at)
    chosen = steps if steps is not None else size.steps[0]
    fit = Fit(
        sweep_digest=digest,
        pieces=pieces,
        noise_scale=noise,
        noise_answers=noise_answers,
        answers_per_prompt=base.algo.samples_per_prompt,
        prompts_per_step=prompts,
        steps=chosen,
        estimate=spent + seconds_at(chosen),
        spent=spent,
        budget=budget,
        fits=steps is not None,
    )
    return fit, noise_table


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_fit(path: Path, digest: str) -> tuple[Fit, list[str]] | None:
    """The fit (and noise table) an earlier run of this command made for the same sized file, else None."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved["fit"]["sweep_digest"] != digest:
        return None
    fields = {**saved["fit"], "pieces": Pieces(**saved["fit"]["pieces"])}
    return Fit(**fields), saved["noise_table"]


def reusable_fit(
    earlier: tuple[Fit, list[str]] | None, budget: float | None, runs: Path
) -> tuple[Fit, list[str]] | None:
    """The earlier fit when it was made for this budget or its runs have started (a resumed sweep keeps the
    steps its runs started with); None (fit again) when the budget changed before any run started."""
    if earlier is None or earlier[0].budget == budget:
        return earlier
    if runs.is_dir():
        print(f"gpu-science: keeping the fit to {earlier[0].budget} s: {runs} was started with it")
        return earlier
    print(f"gpu-science: the budget changed from {earlier[0].budget} s; fitting again")
    return None


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    size = SIZES[args.size]
    if args.size == "gpu":
        require_cuda("gpu-science", ", or use --size laptop on CPU")
    from vbon_ds.commands.sweep import SweepDriver
    from vbon_ds.commands.sweep_file import load_sweep
    from vbon_ds.errors import VbonError
    from vbon_ds.runlock import run_lock

    budget = args.budget if args.budget is not None else size.budget
    root = args.output_dir.resolve() if args.output_dir else default_output_dir(args.size)
    path = sized_sweep(args.size, root, root.parent / f"{root.name}.yaml")
    digest, fit_file = file_digest(path), root / "fit.json"
    with run_lock(root, "gpu-science", setting="output_dir"):
        earlier = reusable_fit(read_fit(fit_file, digest), budget, root / "runs")
        if earlier is None:
            if (root / "runs").is_dir():
                raise VbonError(
                    f"gpu-science: {root}/runs holds runs of another fit (no fit.json for this sweep file); "
                    "remove that directory or pass another --output-dir"
                )
            fit, noise_table = calibrate(SweepDriver(load_sweep(path)), size, budget, start, digest)
            fit_file.write_text(json.dumps({"fit": asdict(fit), "noise_table": noise_table}, indent=2) + "\n")
        else:
            fit, noise_table = earlier
            print(f"gpu-science: reusing the fit in {fit_file}")
    estimate = estimate_line(fit, budget)
    print(f"gpu-science: {estimate}", flush=True)
    if args.estimate_only:
        return 0
    if not fit.fits and not args.over_budget:
        print(
            f"gpu-science: even {size.steps[0]} steps per run are over the budget of {budget:.0f} s by the "
            "estimate; shrink launch/sweep_science.yaml or pass --over-budget",
            file=sys.stderr,
        )
        return 3
    fitted = [f"train.steps={fit.steps}", f"train.prompts_per_step={fit.prompts_per_step}"]
    run_file = sized_sweep(args.size, root, root.parent / f"{root.name}.fitted.yaml", fitted)
    code = subprocess.run(
        [sys.executable, "-m", "vbon_ds", "sweep", "--config", str(run_file)], check=False
    ).returncode
    if code != 0:
        print(f"gpu-science: the sweep failed (exit {code}); see {root}/logs", file=sys.stderr)
        return code
    noise = noise_line(fit, noise_table)
    block = results_block(args.size, root, estimate, noise, time.monotonic() - start)
    out = root / "RESULTS_block.md"
    out.write_text(block, encoding="utf-8")
    print(block)
    print(f"gpu-science: wrote {out}; append it to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
