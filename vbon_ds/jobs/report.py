"""The report of `vbon evaluate`: its rows (one point of the reward-KL plane each), the Pareto front
marked on them (dominance outside one standard error, paired over the shared prompts:
frontier.DOMINANCE_RULE), the markdown table with that rule under it, the paired differences against
BoN(vbon.n), the share-of-BoN lines, the reward-KL plot and the files written.

Writes results.json, results.md and reward_kl.png under train.output_dir/eval, or PREFIX.json/.md/.png
with `--out PREFIX`; `check_report_location` checks that place before any work. What the numbers are:
`jobs/evaluate.py`, which measures them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vbon_ds.config import ExperimentConfig
from vbon_ds.core.frontier import (
    DOMINANCE_RULE,
    Point,
    front_counts,
    kl_difference,
    reward_difference,
    significant_front,
)
from vbon_ds.engines import distributed
from vbon_ds.errors import VbonError, writing
from vbon_ds.runlock import prepare_output_dir

FRESH_REFERENCE = "reference (fresh)"


@dataclass
class EvalRow:
    """One line of the evaluation table (one point of the reward-KL plane); `*_se`: standard errors across
    prompts."""

    method: str
    temperature: float | None
    reward: float
    kl: float
    """BoN rows: for the ties the cached rewards show (equal to kl_bound without ties)."""
    win_rate: float | None
    """None for BoN(M): no cached answer is left to play against."""
    log_f: float | None = None
    kl_bound: float | None = None
    """BoN rows: the tie-free upper bound log n - (n-1)/n on their KL."""
    setting: str = ""
    """What was trained: objective or algorithm, N, beta (runs only)."""
    run: str = ""
    """The run's output directory (runs only)."""
    steps: int | None = None
    reward_se: float | None = None
    kl_se: float | None = None
    win_rate_se: float | None = None
    win_vs_bon: float | None = None
    """Win rate against BoN(bon_n) of the cached reference answers."""
    win_vs_bon_se: float | None = None
    bon_n: int | None = None
    eval_reward: float | None = None
    """Mean evaluation reward (reward.eval_model / eval_function), when one is set."""
    eval_reward_se: float | None = None
    on_front: bool = False
    """No other row dominates it (frontier.DOMINANCE_RULE; on the evaluation reward when set)."""
    prompt_ids: list[str] = field(default_factory=list)
    """The evaluation prompts behind the means, in the order of `per_prompt`'s lists."""
    per_prompt: dict[str, list[float]] = field(default_factory=dict)
    """Per-prompt means of reward, kl (and eval_reward) over prompt_ids: what paired comparisons use."""


def front_point(row: EvalRow) -> Point:
    """The row as a point of the plane the front is taken on: the evaluation reward when it has one."""
    if row.eval_reward is None:
        name, reward, reward_se = "reward", row.reward, row.reward_se
    else:
        name, reward, reward_se = "eval_reward", row.eval_reward, row.eval_reward_se

    def by_prompt(stat: str) -> dict[str, float]:
        values = row.per_prompt.get(stat)
        return {} if values is None else dict(zip(row.prompt_ids, values, strict=True))

    return Point(reward, row.kl, reward_se, row.kl_se, by_prompt(name), by_prompt("kl"))


def mark_front(rows: list[EvalRow]) -> list[EvalRow]:
    """Set on_front on the rows no other row dominates (frontier.DOMINANCE_RULE)."""
    for row, on in zip(rows, significant_front([front_point(row) for row in rows]), strict=True):
        row.on_front = on
    return rows


def _pm(value: float | None, se: float | None, digits: int) -> str:
    if value is None:
        return "-"
    if se is None or math.isnan(se) or se == 0.0:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}"


def _bon_n(rows: list[EvalRow]) -> int | None:
    """The n of the run's BoN(n) (vbon.n), which every row carries."""
    return next((row.bon_n for row in rows if row.bon_n is not None), None)


KL_HEADER = "KL(pi \\|\\| pi_ref) (BoN: for the cache's ties, bound without ties)"


def format_table(rows: list[EvalRow]) -> str:
    """A markdown table of the rows (± standard errors across prompts; * marks the Pareto front)."""
    bon_n = _bon_n(rows)
    with_eval = any(row.eval_reward is not None for row in rows)
    with_setting = any(row.setting for row in rows)
    header = ["method", "temperature"] + (["setting"] if with_setting else [])
    header += ["mean reward"] + (["eval reward"] if with_eval else [])
    header += [KL_HEADER, "win rate vs ref", f"win rate vs BoN({bon_n or 'n'})", "mean log F", "front"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        kl = _pm(row.kl, row.kl_se, 3)
        kl += f" (bound {row.kl_bound:.3f})" if row.kl_bound is not None else ""
        cells = [row.method, "-" if row.temperature is None else f"{row.temperature:g}"]
        cells += [row.setting or "-"] if with_setting else []
        cells += [_pm(row.reward, row.reward_se, 4)]
        cells += [_pm(row.eval_reward, row.eval_reward_se, 4)] if with_eval else []
        cells += [kl, _pm(row.win_rate, row.win_rate_se, 3), _pm(row.win_vs_bon, row.win_vs_bon_se, 3)]
        cells += [_pm(row.log_f, None, 3), "*" if row.on_front else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def front_caption(rows: list[EvalRow]) -> str:
    """What the table's numbers and its front column mean, under the table."""
    reward = "evaluation reward" if any(row.eval_reward is not None for row in rows) else "reward"
    return (
        f"± one standard error over prompts. front (*): on the Pareto front of {reward} against KL. "
        f"{DOMINANCE_RULE}"
    )


def paired_against(rows: list[EvalRow], baseline: str) -> str:
    """A markdown table of each sampled row's reward (the front's) and KL minus the `baseline` row's, with
    standard errors paired over the shared prompts; empty when there is no such row."""
    base = next((row for row in rows if row.method == baseline), None)
    if base is None:
        return ""
    lines = [
        f"| method | temperature | reward - {baseline}'s | KL - {baseline}'s |",
        "|---|---|---|---|",
    ]
    for row in rows:
        if row.temperature is None:
            continue
        point, against = front_point(row), front_point(base)
        reward, kl = reward_difference(point, against), kl_difference(point, against)
        lines.append(f"| {row.method} | {row.temperature:g} | {_pm(*reward, 4)} | {_pm(*kl, 3)} |")
    return "\n".join(lines)


def markdown_report(rows: list[EvalRow]) -> str:
    """results.md: the table, its caption (the dominance rule), the paired differences to BoN(vbon.n)."""
    parts = [format_table(rows), front_caption(rows)]
    bon_n = _bon_n(rows)
    paired = paired_against(rows, f"BoN({bon_n})")
    if paired:
        parts += [f"Paired over the shared prompts, against BoN({bon_n}) of the cached answers:", paired]
    return "\n\n".join(parts) + "\n"


def method_front_counts(
    rows: list[EvalRow], method_of: dict[str, str], seed_of: dict[str, int]
) -> list[dict[str, Any]]:
    """Per method (`method_of`: run name -> method), its runs, their seeds (`seed_of`) and points (a run at
    one evaluation temperature), and how many points are on the Pareto front of the trained runs' points
    alone and on the table's front (which has BoN(n) and the reference too); by frontier.DOMINANCE_RULE."""
    runs = [row for row in rows if row.run and row.method in method_of]
    among_runs = significant_front([front_point(row) for row in runs])
    methods = [method_of[row.method] for row in runs]
    with_bon = front_counts(methods, [row.on_front for row in runs])
    counts = []
    for method, (on, points) in front_counts(methods, among_runs).items():
        names = list(dict.fromkeys(row.method for row in runs if method_of[row.method] == method))
        entry = {"method": method, "runs": names, "seeds": [seed_of[name] for name in names]}
        counts.append(entry | {"points": points, "on_front": on, "on_table_front": with_bon[method][0]})
    return counts


def format_front_counts(counts: list[dict[str, Any]]) -> str:
    """The front counts as a markdown table, the rule under it."""
    lines = [
        "| method | runs (seed) | on the front of the trained runs | on the front with BoN(n), reference |",
        "|---|---|---|---|",
    ]
    for entry in counts:
        runs = ", ".join(f"{name} ({seed})" for name, seed in zip(entry["runs"], entry["seeds"], strict=True))
        share = entry["on_front"] / entry["points"]
        lines.append(
            f"| {entry['method']} | {runs} | {entry['on_front']} of {entry['points']} ({share:.0%}) | "
            f"{entry['on_table_front']} of {entry['points']} |"
        )
    return "\n".join(lines) + f"\n\nA point is a run at one evaluation temperature. {DOMINANCE_RULE}\n"


def share_of_bon_gain(rows: list[EvalRow]) -> list[str]:
    """One line per trained policy: its mean reward gain over the cached reference as a share of
    BoN(vbon.n)'s, beside its KL and BoN(n)'s KL and KL bound (vBoN's claim: a share near 1 at that KL)."""
    cached = {row.method: row for row in rows if row.temperature is None}
    bon_n = _bon_n(rows)
    reference, best = cached.get("reference"), cached.get(f"BoN({bon_n})")
    if reference is None or best is None or best.reward == reference.reward:
        return []
    bon_gain = best.reward - reference.reward
    lines = []
    for row in rows:
        if row.temperature is None or row.method == FRESH_REFERENCE:
            continue
        gain = row.reward - reference.reward
        lines.append(
            f"{row.method} (T = {row.temperature:g}): reward gain over the reference {gain:+.3f}, "
            f"{gain / bon_gain:.0%} of BoN({bon_n})'s {bon_gain:+.3f}, at KL {row.kl:.3f} "
            f"(BoN({bon_n}): {best.kl:.3f}, bound {best.kl_bound:.3f})"
        )
    return lines


def plot_reward_kl(rows: list[EvalRow], path: Path) -> None:
    """Reward (the evaluation reward when set) against KL: the BoN curve (at the KL for the cache's ties,
    its tie-free bound marked beside), one marker series per policy over temperatures, the Pareto front as
    a step line with its points circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def y(row: EvalRow) -> float:
        return row.reward if row.eval_reward is None else row.eval_reward

    fig, ax = plt.subplots(figsize=(7, 4.5))
    cache_rows = [r for r in rows if r.temperature is None]
    ax.plot([r.kl for r in cache_rows], [y(r) for r in cache_rows], "o-", color="gray", label="BoN(n)")
    bounded = [r for r in cache_rows if r.kl_bound is not None]
    ax.plot(
        [r.kl_bound for r in bounded], [y(r) for r in bounded], "x", color="gray", label="BoN(n) KL bound"
    )
    for r in cache_rows:
        ax.annotate(r.method, (r.kl, y(r)), fontsize=7, xytext=(3, -8), textcoords="offset points")
    markers = "sD^v<>pPX*h"
    for i, label in enumerate(dict.fromkeys(r.method for r in rows if r.temperature is not None)):
        mine = [r for r in rows if r.method == label]
        setting = f" [{mine[0].setting}]" if mine[0].setting else ""
        ax.errorbar(
            [r.kl for r in mine],
            [y(r) for r in mine],
            xerr=[r.kl_se or 0.0 for r in mine],
            yerr=[(r.reward_se if r.eval_reward is None else r.eval_reward_se) or 0.0 for r in mine],
            fmt=markers[i % len(markers)] + "--",
            capsize=2,
            label=f"{label}{setting}",
        )
        for r in mine:
            ax.annotate(
                f"T={r.temperature:g}", (r.kl, y(r)), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
    front = sorted((r for r in rows if r.on_front), key=lambda r: r.kl)
    if front:
        ax.step([r.kl for r in front], [y(r) for r in front], where="post", color="black", alpha=0.4, lw=1)
        ax.scatter(
            [r.kl for r in front],
            [y(r) for r in front],
            s=120,
            facecolors="none",
            edgecolors="black",
            label="Pareto front",
        )
    ax.set_xlabel("KL(pi || pi_ref), pi_ref at the cache temperature")
    ax.set_ylabel("mean evaluation reward" if any(r.eval_reward is not None for r in rows) else "mean reward")
    ax.grid(alpha=0.3)
    # beside the axes: inside, a sweep's ten entries hid the points of high KL
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def report_paths(cfg: ExperimentConfig, prefix: str | Path | None) -> tuple[Path, tuple[Path, Path, Path]]:
    """(directory, (json, markdown, png)): output_dir/eval/results.json, ... or PREFIX.json, ..."""
    if prefix is None:
        out = Path(cfg.train.output_dir) / "eval"
        return out, (out / "results.json", out / "results.md", out / "reward_kl.png")
    prefix = Path(prefix)
    json_path, md_path, png_path = (
        prefix.with_name(f"{prefix.name}{ext}") for ext in (".json", ".md", ".png")
    )
    return prefix.parent, (json_path, md_path, png_path)


def check_report_location(cfg: ExperimentConfig, prefix: str | Path | None) -> Path:
    """Create the report's directory and check that its files can be written there, before any work (a
    one-line VbonError saying why not, on every rank); returns the directory."""
    out, paths = report_paths(cfg, prefix)
    what = f"--out {prefix}" if prefix is not None else f"the evaluation's directory {out}"
    fix = "give another --out" if prefix is not None else "give --out PREFIX elsewhere"

    def check() -> None:
        try:
            prepare_output_dir(out, setting="--out" if prefix is not None else "the evaluation's directory")
        except VbonError as err:
            raise VbonError(f"{err}; {fix}") from None
        unwritable = [p for p in paths if p.is_dir() or (p.exists() and not os.access(p, os.W_OK))]
        if unwritable or not os.access(out, os.W_OK | os.X_OK):
            raise VbonError(f"{what}: cannot write {unwritable[0] if unwritable else out}; {fix}")

    distributed.from_main(check)
    return out


def write_report(cfg: ExperimentConfig, rows: list[EvalRow], prefix: str | Path | None = None) -> Path:
    """results.json, results.md and reward_kl.png in output_dir/eval, or PREFIX.json/.md/.png (rank 0);
    returns the directory written to."""
    out, paths = report_paths(cfg, prefix)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        with writing(paths[0]):
            paths[0].write_text(json.dumps([asdict(r) for r in rows], indent=2))
        with writing(paths[1]):
            paths[1].write_text(markdown_report(rows))
        with writing(paths[2]):
            plot_reward_kl(rows, paths[2])
    return out
