"""`vbon plan`'s work: the answers and tokens a run generates (reference cache, training rollouts and
evaluation), the tokens each training step runs through forward and backward, and hours of generation.

    work = work_plan(cfg)
    print(format_work(work, world_size=8, tokens_per_second=None))  # None: the sampler's assumed rate

Token counts are upper bounds: every prompt at data.max_prompt_tokens, every answer at
generation.max_new_tokens (an answer that stops at EOS is shorter). Prompt counts are those `vbon refcache`
and `vbon train` load (vbon_ds.data.prompts, capped by data.max_train_prompts / max_eval_prompts) when
data.source is on this machine; a hub data set is never read or downloaded here, so its count is the cap,
or unknown without one.

    reference cache     (train prompts + eval prompts, an id in both once) x vbon.num_ref_samples answers
    training rollouts   train.steps x train.prompts_per_step x algo.samples_per_prompt (offline: none)
    evaluation          2 policies (the fresh reference, the run) x eval prompts x generation.eval_samples
                        x len(generation.eval_temperatures)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from vbon_ds.algorithms.onpolicy import old_logprobs_from_sampling
from vbon_ds.algorithms.registry import algorithm_of
from vbon_ds.config import ExperimentConfig
from vbon_ds.data.prompts import load_prompts
from vbon_ds.engines.ds_config import precision
from vbon_ds.engines.memory_plan import planned_sampler

ASSUMED_TOKENS_PER_SECOND = {"hf": 1000.0, "vllm": 5000.0}
"""Generated tokens/s per GPU when `--tokens-per-second` is not given. Assumptions, not measurements:
benchmarks/RESULTS.md has no GPU generation measurement yet (its only generation rate, 611 tokens/s, is a
19M-parameter model on 2 CPU cores). Order of magnitude for a 1-7B model on an 80 GB card, batched; the
real rate falls with model size, so measure yours and pass it."""

EVALUATED_POLICIES = 2
"""`vbon evaluate` samples the fresh reference and the run's policy (jobs/evaluate.py)."""


@dataclass(frozen=True)
class PromptCount:
    count: int | None
    """None: unknown (a hub data set without a cap)."""
    how: str
    """Where the count comes from, for the report."""
    exact: bool
    """Counted in the data set, rather than a cap that a smaller data set would not reach."""


@dataclass(frozen=True)
class Generation:
    """One job's sampling: `per_prompt` answers to each of `prompts`, each of at most max_new_tokens."""

    job: str
    prompts: int | None
    """None: unknown."""
    per_prompt: int
    factors: str
    """What `per_prompt` is made of, e.g. 'M=256'."""
    max_new_tokens: int

    @property
    def answers(self) -> int | None:
        return None if self.prompts is None else self.prompts * self.per_prompt

    @property
    def tokens(self) -> int | None:
        return None if self.answers is None else self.answers * self.max_new_tokens


@dataclass(frozen=True)
class WorkPlan:
    sampler: str
    sampler_why: str
    train: PromptCount
    eval: PromptCount
    cache_prompts: int | None
    draws: int
    """Prompts training draws: train.steps x train.prompts_per_step (a prompt may come back in a later
    epoch when the data set has fewer)."""
    jobs: list[Generation]
    sequence_tokens: int
    """At most data.max_prompt_tokens + generation.max_new_tokens per sequence."""
    per_step: dict[str, int]
    """Sequences of one training step through each pass (forward, or forward and backward)."""
    notes: list[str] = field(default_factory=list)

    @property
    def cache(self) -> Generation:
        return self.jobs[0]


def count_prompts(cfg: ExperimentConfig, role: str) -> tuple[PromptCount, set[str] | None]:
    """The prompts of `role` that the jobs load, and their ids when the data set was read here."""
    cap = cfg.data.max_train_prompts if role == "train" else cfg.data.max_eval_prompts
    cap_field = f"data.max_{role}_prompts"
    source = cfg.data.source
    if source and Path(source).expanduser().exists():
        ids = load_prompts(cfg.data, role).ids  # as the jobs load them, cap included
        return PromptCount(len(ids), f"read from data.source, {cap_field}={cap}", exact=True), set(ids)
    # A hub data set (or a path on another machine): the plan neither downloads nor guesses its size.
    where = "data.source not on this machine, not downloaded" if source else "data.source is empty"
    if cap:
        return PromptCount(cap, f"at most: {cap_field}; {where}", exact=False), None
    return PromptCount(None, f"{where}; set {cap_field}", exact=False), None


def work_plan(cfg: ExperimentConfig) -> WorkPlan:
    """What a run of `cfg` generates and trains on (ConfigError/VbonError: the data set cannot be read)."""
    algorithm = algorithm_of(cfg)
    gen, train_cfg, algo = cfg.generation, cfg.train, cfg.algo
    sampler, why = planned_sampler(cfg)
    (train, train_ids), (evals, eval_ids) = count_prompts(cfg, "train"), count_prompts(cfg, "eval")
    if train_ids is not None and eval_ids is not None:
        cache_prompts: int | None = len(train_ids | eval_ids)
    elif train.count is not None and evals.count is not None:
        cache_prompts = train.count + evals.count  # at most: an id in both is cached once
    else:
        cache_prompts = None
    draws = train_cfg.steps * train_cfg.prompts_per_step
    cache = Generation(
        "reference cache (`vbon refcache`)", cache_prompts, cfg.vbon.num_ref_samples,
        f"M={cfg.vbon.num_ref_samples}", gen.max_new_tokens,
    )  # fmt: skip
    k = algo.samples_per_prompt
    rollouts = Generation("training rollouts (`vbon train`)", draws, k, f"K={k}", gen.max_new_tokens)
    samples, temps = gen.eval_samples, len(gen.eval_temperatures)
    evaluation = Generation(
        "evaluation (`vbon evaluate`)", evals.count, EVALUATED_POLICIES * samples * temps,
        f"{EVALUATED_POLICIES} policies x {samples} samples x {temps} temperatures", gen.max_new_tokens,
    )  # fmt: skip
    jobs = [cache, rollouts, evaluation] if algorithm.on_policy else [cache, evaluation]
    notes = []
    if not algorithm.on_policy:
        notes.append(f"{algo.name}: no rollouts; training reads the reference cache's answers")
    if train.count is None or train.count > draws:
        covered = "all the split's" if train.count is None else f"{train.count:,}"
        notes.append(
            f"the cache covers {covered} training prompts, but training draws {draws:,}: "
            f"data.max_train_prompts={draws} caches only the prompts the run can use"
        )
    return WorkPlan(
        sampler, why, train, evals, cache_prompts, draws, jobs,
        cfg.data.max_prompt_tokens + gen.max_new_tokens, _per_step(cfg), notes,
    )  # fmt: skip


def _per_step(cfg: ExperimentConfig) -> dict[str, int]:
    """Sequences through each pass of one training step (experience, then algo epochs of the update)."""
    algorithm, algo, prompts = algorithm_of(cfg), cfg.algo, cfg.train.prompts_per_step
    epochs = algo.epochs
    if not algorithm.on_policy:
        rows = prompts * algo.subsets_per_prompt * (2 if algorithm.pair_graphs else 1)
        return {
            f"actor forward+backward ({epochs} epochs)": epochs * rows,
            "reference forward (at most: once per cached answer, then kept)": rows,
        }
    rows = prompts * algo.samples_per_prompt
    dtype = getattr(torch, precision(cfg, on_gpu=True, bf16_supported=True))
    passes = {f"actor forward+backward ({epochs} epochs)": epochs * rows}
    vllm_dtype = cfg.generation.vllm_dtype
    own_precision = planned_sampler(cfg)[0] == "hf" or vllm_dtype == "auto"
    if not old_logprobs_from_sampling(cfg, dtype, dtype if own_precision else getattr(torch, vllm_dtype)):
        passes["actor forward (old log-probs)"] = rows
    passes["reference forward"] = rows
    if algorithm.needs.critic:
        passes["critic forward (values)"] = rows
        passes[f"critic forward+backward ({epochs} epochs)"] = epochs * rows
    if not cfg.reward.function:
        passes["reward model forward"] = rows
    return passes


# ------------------------------------------------------------------ report


def _count(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,}"


def _hours(tokens: int | None, rate: float, world_size: int) -> str:
    return "unknown" if tokens is None else f"{tokens / (rate * world_size) / 3600:.2f}"


def rate_source(sampler: str, tokens_per_second: float | None) -> tuple[float, str]:
    """(generated tokens/s per GPU, where it comes from): the flag, else the sampler's assumed rate."""
    if tokens_per_second is not None:
        return tokens_per_second, "--tokens-per-second"
    return ASSUMED_TOKENS_PER_SECOND[sampler], (
        f"ASSUMED for {sampler}, not measured: benchmarks/RESULTS.md has no GPU generation rate yet; "
        "pass --tokens-per-second"
    )


def format_work(plan: WorkPlan, world_size: int, tokens_per_second: float | None) -> str:
    """The work as markdown tables: the generating jobs with hours on `world_size` GPUs, one step's passes."""
    rate, source = rate_source(plan.sampler, tokens_per_second)
    lines = [
        f"Work of the run (sampler: {plan.sampler}, {plan.sampler_why}):",
        "",
        f"prompts: train {_count(plan.train.count)} ({plan.train.how}); eval {_count(plan.eval.count)} "
        f"({plan.eval.how}); training draws {plan.draws:,} (train.steps x train.prompts_per_step)",
        "",
        f"| job | prompts | answers | new tokens, at most | hours on {world_size} GPUs |",
        "|---|---|---|---|---|",
    ]
    for job in plan.jobs:
        lines.append(
            f"| {job.job} | {_count(job.prompts)} | {_count(job.prompts)} x {job.factors} = "
            f"{_count(job.answers)} | {_count(job.tokens)} | {_hours(job.tokens, rate, world_size)} |"
        )
    lines += [
        "",
        f"hours: generation alone, at {rate:g} generated tokens/s per GPU ({source})",
        "",
        f"One training step, sequences of at most {plan.sequence_tokens:,} tokens (prompt + answer):",
        "",
        "| pass | sequences | tokens, at most |",
        "|---|---|---|",
        *(f"| {name} | {n:,} | {n * plan.sequence_tokens:,} |" for name, n in plan.per_step.items()),
    ]
    lines += [""] * bool(plan.notes) + [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def cache_line(plan: WorkPlan) -> str:
    """The reference cache in one line, as recipes and the README state it (tests/test_recipes.py)."""
    cache = plan.cache
    return (
        f"reference cache: {_count(cache.prompts)} x {cache.factors} = {_count(cache.answers)} answers, "
        f"at most {_count(cache.tokens)} new tokens"
    )
