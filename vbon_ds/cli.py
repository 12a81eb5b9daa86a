"""The `vbon` command: one subcommand per job. Errors a user can fix print one line and exit 2;
`vbon plan` exits 3 when the run does not fit the card."""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vbon_ds.config import dump_config, load_config
from vbon_ds.errors import VbonError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump), still exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_set_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set train.lr=1e-5 (repeatable)",
    )


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="experiment YAML (see launch/)")
    _add_set_arg(parser)


def _cmd_config(args: argparse.Namespace) -> None:
    if args.reference:
        from vbon_ds.config import config_reference

        print(config_reference())
        return
    if args.config is None:
        raise VbonError("vbon config: give --config FILE (or --reference for the field list)")
    print(dump_config(load_config(args.config, args.overrides)), end="")


def _cmd_toy(args: argparse.Namespace) -> None:
    from vbon_ds.core.toy import format_toy_table, run_toy

    print(format_toy_table(run_toy(ns=args.n, seed=args.seed, sampled=args.sampled)))


def _cmd_demo(args: argparse.Namespace) -> None:
    from vbon_ds.commands.demo import run_demo

    run_demo(preset=args.preset, output_dir=args.output_dir, extra=args.overrides)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


PLAN_DOES_NOT_FIT = 3
"""`vbon plan`'s exit code when the estimate exceeds the card (2 stays for config errors)."""


def _positive_number(what: str) -> Callable[[str], float]:
    """An argparse type for a finite number > 0; `what` says what the number is in the error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected {what} (> 0), got {text!r}")
        return value

    return parse


def _cmd_plan(args: argparse.Namespace) -> int:
    from vbon_ds.algorithms.registry import training_memory_plan
    from vbon_ds.algorithms.work_plan import format_work, work_plan
    from vbon_ds.engines.memory_plan import DEFAULT_CARD_GB, format_plan

    cfg = load_config(args.config, args.overrides)
    plan = training_memory_plan(cfg, args.world_size, args.gpu_memory_gb or DEFAULT_CARD_GB)
    work = work_plan(cfg)
    print(format_plan(plan))
    print()
    print(format_work(work, args.world_size, args.tokens_per_second))
    return 0 if plan.fits() else PLAN_DOES_NOT_FIT


def _job(module: str) -> Callable[[argparse.Namespace], None]:
    """A subcommand that loads the config and hands it to vbon_ds.jobs.<module>.run."""

    def command(args: argparse.Namespace) -> None:
        import importlib

        cfg = load_config(args.config, args.overrides)
        importlib.import_module(f"vbon_ds.jobs.{module}").run(cfg)

    return command


def _part(text: str) -> tuple[int, int]:
    """`I/N` with 0 <= I < N: part I of N of the prompts (`vbon refcache --part`, one job-array task)."""
    index, _, parts = text.partition("/")
    if not (index.isdigit() and parts.isdigit() and int(index) < int(parts)):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(index), int(parts)


def _cmd_refcache(args: argparse.Namespace) -> None:
    from vbon_ds.jobs import build_refcache

    build_refcache.run(load_config(args.config, args.overrides), part=args.part)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from vbon_ds.jobs import evaluate

    evaluate.run(load_config(args.config, args.overrides), run_dirs=args.runs, out=args.out)


def _cmd_sweep(args: argparse.Namespace) -> None:
    from vbon_ds.commands.sweep import run_sweep

    run_sweep(args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vbon", description="Variational Best-of-N alignment with DeepSpeed.")
    # The deepspeed launcher passes --local_rank=K before the subcommand unless given --no_local_rank;
    # the rank comes from LOCAL_RANK in the environment either way.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    for name, module, help_text in (
        ("train", "train", "train a policy with vBoN, KL-RL or an offline baseline on DeepSpeed engines"),
        ("refcache", "build_refcache", "sample M reference answers per prompt, score them, cache them"),
        ("bon", "bon_sampling", "Best-of-N sampling baseline from the reference cache"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_args(p)
        p.set_defaults(func=_job(module))
    evaluate = sub.add_parser(
        "evaluate",
        help="policies vs reference vs BoN(n) on one reward-KL plane: reward, KL, win rates, Pareto front",
        description="Evaluate this config's run, or each --runs directory, against the cache and BoN(n).",
    )
    _add_config_args(evaluate)
    evaluate.add_argument(
        "--runs",  # not --run: launchers such as torchrun would take it for an abbreviation of --run-path
        nargs="+",
        action="extend",
        default=[],
        metavar="DIR",
        help="runs' train.output_dirs, each evaluated at its latest checkpoint",
    )
    evaluate.add_argument(
        "--out",
        metavar="PREFIX",
        help="write PREFIX.json, PREFIX.md and PREFIX.png (default: train.output_dir/eval/results.*)",
    )
    evaluate.set_defaults(func=_cmd_evaluate)

    sweep = sub.add_parser(
        "sweep",
        help="train several methods on one reference cache, evaluate them all, draw the reward-KL frontier",
        description="Run a sweep YAML (see launch/sweep_smollm2.yaml): refcache, each run, one evaluation.",
    )
    sweep.add_argument("--config", required=True, metavar="FILE", help="sweep YAML")
    sweep.set_defaults(func=_cmd_sweep)

    refcache = sub.choices["refcache"]
    refcache.add_argument(
        "--part",
        type=_part,
        default=(0, 1),
        metavar="I/N",
        help="only part I of N of the prompts (a job-array task); a run without it validates the whole cache",
    )
    refcache.set_defaults(func=_cmd_refcache)

    plan = sub.add_parser(
        "plan",
        help=f"memory per GPU and the work (answers, tokens, hours) of a run (exit {PLAN_DOES_NOT_FIT}: does "
        "not fit)",
        description="Estimate the memory per GPU of each engine `vbon train` builds for this config, and the "
        "answers and tokens its jobs generate and train on, with hours of generation at a rate.",
        epilog=f"exit status: 0 fits the card, {PLAN_DOES_NOT_FIT} does not fit, 2 config error (e.g. batch "
        "sizes that do not divide the world size)",
    )
    _add_config_args(plan)
    plan.add_argument(
        "--world-size", type=_positive_int, required=True, metavar="W", help="number of GPUs (ranks)"
    )
    plan.add_argument(
        "--gpu-memory-gb",
        type=_positive_number("the memory of one card in GB"),
        metavar="GB",
        help="memory of one card, GiB (default: 80, the TL;DR recipes' cards; vLLM takes its share of it)",
    )
    plan.add_argument(
        "--tokens-per-second",
        type=_positive_number("generated tokens per second per GPU"),
        default=None,
        metavar="R",
        help="generated tokens/s per GPU of the run's sampler, for the hours (default: an assumed rate per "
        "sampler, labelled as such; benchmarks/RESULTS.md has no GPU measurement yet)",
    )
    plan.set_defaults(func=_cmd_plan)

    demo = sub.add_parser("demo", help="the whole pipeline on embedded defaults, no network needed")
    demo.add_argument(
        "--preset", choices=["tiny", "smollm2"], default="smollm2", help="model and reward preset"
    )
    demo.add_argument(
        "--output-dir", help="where the run writes its outputs (runs/demo; same as --set train.output_dir=)"
    )
    _add_set_arg(demo)
    demo.set_defaults(func=_cmd_demo)

    toy = sub.add_parser("toy", help="exactly solvable toy world: vBoN vs KL-RL vs BoN-SFT vs BoN")
    toy.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16], help="values of N for the table")
    toy.add_argument("--seed", type=int, default=0, help="random seed")
    toy.add_argument(
        "--sampled", action="store_true", help="train with sampled policy gradients, not exact ones"
    )
    toy.set_defaults(func=_cmd_toy)

    config = sub.add_parser("config", help="print the resolved config (defaults + file + --set overrides)")
    config.add_argument("--config", metavar="FILE", help="experiment YAML")
    _add_set_arg(config)
    config.add_argument(
        "--reference", action="store_true", help="print every field with its meaning (markdown)"
    )
    config.set_defaults(func=_cmd_config)
    return parser


def _process_group() -> Any:
    """torch.distributed when a process group is up, else None (without importing torch for `vbon config`)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    joined_before = _process_group() is not None
    code = None
    try:
        code = _dispatch(args)
        return code
    finally:
        # A process group left to the interpreter's exit can abort in gloo's destructor ("terminate called
        # without an active exception"), turning a finished run's exit code into a crash's; so can a rank
        # tearing its group down while another still works (rank 0 writing final/). A finished command
        # waits for every rank first; a failed one does not (a rank that died would never arrive).
        dist = _process_group()
        if dist is not None and not joined_before:
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()


def _dispatch(args: argparse.Namespace) -> int:
    try:
        code = args.func(args)  # None, or a command's own exit status (`vbon plan`: does not fit)
    except VbonError as err:
        print(f"vbon: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vbon: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk where no `errors.writing` guard named the file
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {err.filename}" if err.filename else ""
        print(f"vbon: error: no space left on device{where} ({os.strerror(err.errno)})", file=sys.stderr)
        return 2
    return code or 0
