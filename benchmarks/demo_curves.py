"""Per-step training curves (reward, KL) of the SmolLM2 demo under several settings, on one shared cache.

    python benchmarks/demo_curves.py --runs /tmp/demo_curves [--evaluate] [--only NAME ...] [--report-only]

Each setting is the `smollm2` demo preset plus a few overrides. The reference cache is built once (or
reused from --refcache) and shared through train.refcache_dir, so a setting costs only its training (and,
with --evaluate, its evaluation). Writes benchmarks/demo_curves.md (per-step train/reward, train/kl and
the wall time of each run, plus the evaluation table when there is one) and benchmarks/demo_curves.png.
Settings that change generation.max_new_tokens or vbon.num_ref_samples need a cache of their own. A cache
built here is sampled with the first setting's generation batch, and the batch changes which answers are
drawn: to rerun a setting on the cache it was measured on, pass that cache with --refcache (the "_c64" ones
and those above them: launch/sweep_smollm2.yaml's refcache/; the later ones: a `vbon demo` run's refcache/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from vbon_ds.commands.demo import demo_config
from vbon_ds.config import dump_config
from vbon_ds.monitor import read_scalars

HERE = Path(__file__).resolve().parent

# name -> overrides on top of the smollm2 preset: the settings tried for issue 12 (the measured curves,
# some cut short, are in demo_curves.md). The preset is lora8_lr1e-3_b128; the earlier ones ran with
# generation batches of 64 answers, which they keep here so that they rerun as measured. Every setting
# down to the "_c64" ones ran on the cache built with generation batches of 64 (the demo's before issue
# 12's end, launch/sweep_smollm2.yaml's); the later ones on the preset's own, which samples other answers.
_OLD = ["generation.batch_size=64"]
_ADAM_ON_ALL = [*_OLD, "model.lora_rank=0", "model.trainable_layers=0"]
_TOP4 = [*_OLD, "model.lora_rank=0", "model.trainable_layers=4"]
_LORA8 = ["model.lora_rank=8"]
_K8_SMALL = ["algo.samples_per_prompt=8", "train.prompts_per_step=2", "train.steps=30"]
_B128 = [
    *_LORA8,
    "algo.samples_per_prompt=8",
    "train.prompts_per_step=16",
    "train.steps=10",
    "generation.batch_size=128",
]
SETTINGS: dict[str, list[str]] = {
    # the demo before issue 12: all weights, 12 steps of 8 prompts x 4 answers, lr 3e-5
    "before": [*_ADAM_ON_ALL, "algo.samples_per_prompt=4", "train.prompts_per_step=8", "train.steps=12",
               "train.lr=3e-5"],
    "top4_lr1e-4_k8": [*_TOP4, "algo.samples_per_prompt=8", "train.prompts_per_step=6", "train.steps=12",
                       "train.lr=1e-4"],
    "top4_lr3e-4_k8": [*_TOP4, "algo.samples_per_prompt=8", "train.prompts_per_step=6", "train.steps=12",
                       "train.lr=3e-4"],
    "top4_lr1e-4_k8_small": [*_TOP4, *_K8_SMALL, "train.lr=1e-4"],
    "lora8_lr5e-4_k8_small": [*_OLD, *_LORA8, *_K8_SMALL, "train.lr=5e-4"],
    "lora8_lr1.5e-3_k8_small": [*_OLD, *_LORA8, *_K8_SMALL, "train.lr=1.5e-3"],
    # the demo's preset from 2026-11-28 to issue 12's end: 12 steps of 4 prompts x 8 answers
    "lora8_lr5e-4_b32": [*_OLD, *_LORA8, "algo.samples_per_prompt=8", "train.prompts_per_step=4",
                         "train.steps=12", "train.lr=5e-4"],
    "lora8_lr1e-3_b128_c64": [*_B128, "train.lr=1e-3"],
    "lora8_lr1.25e-3_b128_c64": [*_B128, "train.lr=1.25e-3"],
    "lora8_lr2e-3_b128_c64": [*_B128, "train.lr=2e-3"],
    "lora8_lr1e-3_b128": [*_B128, "train.lr=1e-3"],  # the preset (its section: the whole `vbon demo`)
    "lora8_lr1.25e-3_b128x12": [*_B128, "train.lr=1.25e-3", "train.steps=12"],
    "lora8_lr1.1e-3_b128x12": [*_B128, "train.lr=1.1e-3", "train.steps=12"],
    # longer runs (training 16.5 and 25.2 min): twice the answers per step; three times the steps, lower lr
    "lora8_lr1e-3_b256": [*_B128, "train.lr=1e-3", "train.prompts_per_step=32"],
    "lora8_lr6e-4_b128x30": [*_B128, "train.lr=6e-4", "train.steps=30"],
}  # fmt: skip


def run(cmd: list[str], log: Path) -> float:
    """Run `cmd` with its output in `log`; the wall time in seconds (raises on failure)."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True, env=dict(os.environ))
    return time.perf_counter() - t0


def train_and_evaluate(name: str, runs: Path, refcache: Path, evaluate: bool) -> None:
    out = runs / name
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config("smollm2", out, [*SETTINGS[name], f"train.refcache_dir={refcache}"])
    (out / "config.yaml").write_text(dump_config(cfg))
    vbon = [sys.executable, "-m", "vbon_ds"]
    if not (refcache / "fingerprint.json").exists():
        print(f"{name}: building the reference cache in {refcache}", flush=True)
        run([*vbon, "refcache", "--config", str(out / "config.yaml")], out / "refcache.log")
    times = {"train_s": run([*vbon, "train", "--config", str(out / "config.yaml")], out / "train.log")}
    if evaluate:
        times["evaluate_s"] = run([*vbon, "evaluate", "--config", str(out / "config.yaml")], out / "eval.log")
    (out / "times.json").write_text(json.dumps(times))
    print(f"{name}: {times}", flush=True)


def _override(overrides: list[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")]
    return values[-1] if values else None


def curves(out: Path) -> dict[str, list[float]]:
    scalars = read_scalars(out / "tensorboard")
    return {key: [v for _, v in scalars.get(f"train/{key}", [])] for key in ("reward", "log_F", "kl")}


def previous_sections(path: Path) -> dict[str, str]:
    """The "## name" sections of an existing report: settings measured before whose runs are gone."""
    if not path.exists():
        return {}
    sections = path.read_text().split("\n## ")[1:]
    return {text.split("\n", 1)[0].strip(): "## " + text.strip() + "\n" for text in sections}


def curves_of_section(section: str) -> dict[str, list[float]]:
    """The per-step rows of a report section, back as numbers."""
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] in ("reward", "log_F", "kl") and cells[0] not in rows:
            rows[cells[0]] = [float(cell) for cell in cells[1:]]
    return rows


def overrides_line(name: str) -> str:
    return f"overrides: `{' '.join(SETTINGS[name])}`  "


def with_current_overrides(name: str, text: str) -> str:
    """An old report section with its overrides line as SETTINGS has it now."""
    kept = text.splitlines(keepends=True)
    return "".join(overrides_line(name) + "\n" if line.startswith("overrides: ") else line for line in kept)


def section(name: str, out: Path, c: dict[str, list[float]]) -> str:
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").exists() else {}
    lines = [f"## {name}", "", overrides_line(name)]
    planned = int(_override(SETTINGS[name], "train.steps") or 0)
    if planned > len(c["reward"]):
        lines += [f"stopped by hand after {len(c['reward'])} of {planned} steps  "]
    if times:
        spent = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
        lines += [f"wall time (2 shared cores unless said): {spent}"]
    lines += [""]
    lines += ["| step | " + " | ".join(str(i + 1) for i in range(len(c["reward"]))) + " |"]
    lines += ["|---" * (len(c["reward"]) + 1) + "|"]
    for key in ("reward", "log_F", "kl"):
        lines += [f"| {key} | " + " | ".join(f"{v:.3f}" for v in c[key]) + " |"]
    table = out / "eval" / "results.md"
    if table.exists():
        lines += ["", "Evaluation (held-out prompts):", "", table.read_text().strip()]
    return "\n".join(lines) + "\n"


def report(runs: Path, names: list[str]) -> None:
    """demo_curves.md and .png from the runs in RUNS; a setting with no run there keeps its old section."""
    path = HERE / "demo_curves.md"
    previous = previous_sections(path)
    lines = ["# SmolLM2 demo: per-step training curves", ""]
    lines += ["Generated by `python benchmarks/demo_curves.py`. Per step, over that step's answers (T = 1):"]
    lines += ["reward = mean VADER reward, log_F = mean log F_hat(r) against the prompt's cached reference"]
    lines += [
        "rewards (-1 in expectation under pi_ref, -1/8 under BoN(8)), kl = mean summed log pi/pi_ref.",
        "The settings down to the `_c64` ones ran on the cache built with generation batches of 64, the",
        "later ones on the preset's own (`make demo`'s): their reference and BoN rows differ.",
        "",
    ]
    fig_data = {}
    for name in names:
        out = runs / name
        if (out / "tensorboard").exists():
            fig_data[name] = curves(out)
            lines += [section(name, out, fig_data[name])]
        elif name in previous:
            fig_data[name] = curves_of_section(previous[name])
            lines += [with_current_overrides(name, previous[name])]
    path.write_text("\n".join(lines))
    plot(fig_data, HERE / "demo_curves.png")


def plot(data: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(13, 4.5))
    colors = plt.get_cmap("tab20").colors  # more settings than the default cycle's 10 colours
    for (name, c), color in zip(data.items(), colors * 2, strict=False):
        steps = range(1, len(c["reward"]) + 1)
        ax_r.plot(steps, c["reward"], "o-", ms=3, color=color, label=name)
        ax_k.plot(steps, c["kl"], "o-", ms=3, color=color, label=name)
    ax_r.set(xlabel="step", ylabel="train/reward (mean VADER, T = 1)")
    ax_k.set(xlabel="step", ylabel="train/kl (nats per answer)")
    for ax in (ax_r, ax_k):
        ax.grid(alpha=0.3)
    ax_k.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=Path, default=Path("runs/demo_curves"), help="one directory per setting"
    )
    parser.add_argument("--refcache", type=Path, help="an existing demo cache (default: RUNS/refcache)")
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), help="settings to run (default: all)")
    parser.add_argument("--evaluate", action="store_true", help="also evaluate each trained policy")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from RUNS")
    args = parser.parse_args()
    runs = args.runs.resolve()
    names = args.only or list(SETTINGS)
    if not args.report_only:
        refcache = (args.refcache or runs / "refcache").resolve()
        for name in names:
            train_and_evaluate(name, runs, refcache, args.evaluate)
    report(runs, list(SETTINGS))


if __name__ == "__main__":
    main()
