"""`vbon evaluate`: trained policies against the reference and BoN(n) on the evaluation prompts, on one
reward-KL plane.

    reference:  the M cached answers per prompt (BoN(1)): mean reward, KL 0, win rate 1/2 against itself
    BoN(n):     unbiased order-statistic estimates from the same cache for n = 1, 2, 4, ... < M and vbon.n
                (<= M): expected reward, win rate over a reference answer (n < M), and KL(pi_BoN || pi_ref)
                for the ties the cached rewards show (bon.bon_kl_from_samples; the Pareto front uses it)
                beside its tie-free bound log n - (n-1)/n
    policies:   generation.eval_samples fresh answers per prompt at each generation.eval_temperatures value,
                from the reference ("reference (fresh)") and from each run's latest verified checkpoint:
                mean reward, KL(pi_T || pi_ref) with pi_ref at the reference cache's temperature (one KL axis
                for every point, whatever T), mean log F_hat (answers cut off before EOS at -log(M + 1)
                when reward.missing_eos_score is set, as training credits them), win rates against one
                reference answer and against BoN(vbon.n) of the cached answers; sampled from a random
                stream fixed by train.seed, so two evaluations of one run give the same numbers
Means come with standard errors across prompts (frontier.mean_and_se); every row keeps the prompt ids and
its per-prompt means of reward, KL and evaluation reward, which the report pairs across rows. With
reward.eval_model or reward.eval_function set, every row also reports that evaluation reward (BoN rows: the
cached answers rescored, BoN still choosing by the training reward), and the Pareto front is taken on it;
win rates and log F stay on the training reward, the one the cache holds. `jobs/report.py` marks the Pareto
front, formats the table and writes it: results.json, results.md and reward_kl.png under
train.output_dir/eval, or PREFIX.json/.md/.png with `--out PREFIX`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vbon_ds.algorithms.onpolicy import TokenBatch, policy_logprobs
from vbon_ds.algorithms.registry import algorithm_of, run_label
from vbon_ds.algorithms.rollout import ScoredRollout, sample_and_score, shard_evenly
from vbon_ds.config import ConfigError, ExperimentConfig
from vbon_ds.core import bon
from vbon_ds.core.frontier import expected_bon_other_reward, mean_and_se, prompt_means, win_rate_vs_bon
from vbon_ds.data.prompts import load_prompts
from vbon_ds.data.refcache import RefCache, open_refcache
from vbon_ds.data.rewards import reward_names
from vbon_ds.data.tldr import fit_prompts
from vbon_ds.engines import distributed
from vbon_ds.engines.build import Engines, build_engines
from vbon_ds.engines.builders import build_reward
from vbon_ds.engines.checkpoint_layout import read_trainer_state, resume_checkpoint
from vbon_ds.engines.reward import RewardScorer
from vbon_ds.engines.run_settings import check_resume_compatible, recorded_settings, weights_settings
from vbon_ds.engines.weights import load_trained_weights
from vbon_ds.errors import VbonError
from vbon_ds.jobs.report import (
    FRESH_REFERENCE,
    EvalRow,
    check_report_location,
    format_table,
    mark_front,
    share_of_bon_gain,
    write_report,
)


@dataclass(frozen=True)
class Policy:
    """A policy to sample: the engine (with the run's weights loaded), its label and what it was."""

    label: str
    setting: str = ""
    run: str = ""
    steps: int | None = None


@dataclass
class Context:
    """What every row of one evaluation shares: the prompts, the cache, the scorers, the reference."""

    cfg: ExperimentConfig
    engines: Engines
    cache: RefCache
    eval_scorer: RewardScorer | None
    bon_n: int

    @property
    def ref_temperature(self) -> float:
        """The reference cache's sampling temperature (the fingerprint check makes it the config's)."""
        return self.cfg.generation.temperature


PAIRED_STATS = ("reward", "kl", "eval_reward")
"""The statistics whose per-prompt means a row keeps, for comparisons paired over prompts."""


def _stat(row: dict[str, Any], name: str, values: torch.Tensor | None) -> None:
    """row[name], row[name_se] = mean and standard error over prompts of `values` [P] or [P, K] (prompts in
    the order of row["prompt_ids"]); for PAIRED_STATS also the per-prompt means."""
    if values is None:
        return
    row[name], row[f"{name}_se"] = mean_and_se(values)
    if name in PAIRED_STATS:
        row.setdefault("per_prompt", {})[name] = prompt_means(values).tolist()


def run_setting(cfg_dict: dict[str, Any]) -> str:
    """A short description of a run from its saved config: e.g. 'vBoN (bound) N=8', 'KL-RL beta=0.05',
    'dpo N=8 beta=0.1'."""
    return run_label(cfg_dict)  # the algorithm registry and the objective decide it


def eval_scorer(cfg: ExperimentConfig, engines: Engines) -> RewardScorer | None:
    """The separate evaluation reward (reward.eval_model or reward.eval_function), or None."""
    reward = cfg.reward
    if not (reward.eval_model or reward.eval_function):
        return None
    if reward.eval_function and reward.eval_function not in reward_names():
        known = ", ".join(reward_names())
        raise ConfigError(f"reward.eval_function: unknown reward {reward.eval_function!r} (known: {known})")
    as_training = copy.deepcopy(cfg)
    as_training.reward.function, as_training.reward.model = reward.eval_function, reward.eval_model
    return build_reward(as_training, engines.sizes)


def reference_eos_ids(engines: Engines) -> list[int]:
    """The EOS ids the reference stopped at when it sampled the cache (its tokenizer's and its generation
    config's), the set generation stops on."""
    return engines.reference.weights_engine.eos_ids


def rescored_cache(ctx: Context, prompt_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rewards, evaluation rewards) of the cached answers in draw order, [P, M] float64 each: the
    cached answer texts scored by the evaluation reward, as the refcache scored them (fitted prompt, EOS)."""
    tok, eos_ids = ctx.engines.tokenizer, set(reference_eos_ids(ctx.engines))
    mine, real = shard_evenly(list(range(len(prompt_ids))), distributed.rank(), distributed.world_size())
    records = [ctx.cache.record(prompt_ids[i]) for i in mine]
    prompts = fit_prompts([r.prompt for r in records for _ in r.texts], tok, ctx.cfg.data.max_prompt_tokens)
    texts = [text for r in records for text in r.texts]
    ended = torch.tensor([bool(ids) and ids[-1] in eos_ids for r in records for ids in r.token_ids])
    scores = ctx.eval_scorer.score(prompts, texts, ended_with_eos=ended).view(len(records), -1)
    local = list(zip(mine[:real], [r.rewards for r in records[:real]], scores[:real].tolist(), strict=True))
    # back in prompt order (the shards are round robin), as the per-prompt values of every row are
    gathered = sorted(entry for part in distributed.all_gather_object(local) for entry in part)
    train = torch.tensor([entry[1] for entry in gathered], dtype=torch.float64)
    return train, torch.tensor([entry[2] for entry in gathered], dtype=torch.float64)


def bon_ns(m: int, n_main: int) -> list[int]:
    """The n of the cache's BoN rows: powers of two below M, and vbon.n when the cache has that many."""
    return sorted(
        {n for n in [2**i for i in range(m.bit_length())] if n < m} | ({n_main} if n_main <= m else set())
    )


def bon_rows(ctx: Context, prompt_ids: list[str]) -> list[EvalRow]:
    """Reference (BoN(1)) and BoN(n) for `bon_ns`; from the cache alone."""
    refs = ctx.cache.rewards_for(prompt_ids).double()
    m, n_main = refs.shape[1], ctx.bon_n
    drawn, rescored = rescored_cache(ctx, prompt_ids) if ctx.eval_scorer is not None else (None, None)
    rows = []
    for n in bon_ns(m, n_main):
        row: dict[str, Any] = {"kl_bound": bon.bon_kl_bound(n) if n > 1 else None, "win_rate": None}
        row["prompt_ids"] = list(prompt_ids)
        _stat(row, "kl", bon.bon_kl_from_samples(refs, n))
        _stat(row, "reward", bon.expected_bon_reward(refs, n))
        if n < m:
            _stat(row, "win_rate", bon.bon_win_rate(refs, n))
        if n == n_main:  # BoN(n) against itself: 1/2 by symmetry
            row["win_vs_bon"], row["win_vs_bon_se"] = 0.5, 0.0
        elif n == 1 and n_main < m:  # one reference answer against BoN(n) of the others
            _stat(row, "win_vs_bon", 1 - bon.bon_win_rate(refs, n_main))
        if rescored is not None:
            _stat(row, "eval_reward", expected_bon_other_reward(drawn, rescored, n))
        method = "reference" if n == 1 else f"BoN({n})"
        rows.append(EvalRow(method=method, temperature=None, bon_n=n_main, **row))
    return rows


def seed_sampling(cfg: ExperimentConfig, index: int) -> None:
    """Start the sampling at eval temperature number `index` from a stream fixed by (train.seed, rank,
    index): two evaluations give the same numbers, and the same policy the same answers whatever rows come
    before it (an untrained policy's rows equal the fresh reference's)."""
    torch.manual_seed(cfg.train.seed * 100_003 + 1_009 * distributed.rank() + index)


def penalised_ended(
    cfg: ExperimentConfig, scored: ScoredRollout, prompts: int, k: int
) -> torch.Tensor | None:
    """[prompts, k] whether each answer ended with EOS, when reward.missing_eos_score penalises those that
    did not (log F then puts them at its lowest value, as training does); None otherwise."""
    if cfg.reward.missing_eos_score is None:
        return None
    return scored.rollout.ended_with_eos[: prompts * k].view(prompts, k).cpu()


@torch.no_grad()
def policy_rows(ctx: Context, role: str, who: Policy) -> list[EvalRow]:
    """Sample the `role` engine ("actor" or "reference") generation.eval_samples times per evaluation
    prompt at every eval temperature; KL is against the reference at the cache's temperature."""
    cfg, engines = ctx.cfg, ctx.engines
    policy = getattr(engines, role)
    prompts = load_prompts(cfg.data, "eval")
    k = cfg.generation.eval_samples
    mine, real = shard_evenly(list(range(len(prompts))), distributed.rank(), distributed.world_size())
    prompt_texts = [prompts.texts[i] for i in mine for _ in range(k)]
    real_ids = [prompts.ids[i] for i in mine[:real]]
    refs = ctx.cache.rewards_for(real_ids).double()
    size = cfg.train.micro_batch_size
    rows = []
    for index, temperature in enumerate(cfg.generation.eval_temperatures):
        seed_sampling(cfg, index)
        scored = sample_and_score(
            engines.sampler(role),
            engines.scorer,
            engines.tokenizer,
            prompt_texts,
            cfg.generation,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            temperature=temperature,
        )
        batch = TokenBatch.of(scored.rollout)
        logp = policy_logprobs(policy, batch, temperature, size)
        ref_logp = policy_logprobs(engines.reference, batch, ctx.ref_temperature, size)
        kl = ((logp - ref_logp) * batch.response_mask).sum(1)
        rewards = scored.rewards[: real * k].double().view(real, k)
        local = {
            "reward": rewards,
            "kl": kl[: real * k].double().view(real, k),
            "win_rate": win_rate_vs_bon(rewards, refs, 1),
            "log_f": bon.log_cdf_of_answers(
                rewards, refs, penalised_ended(cfg, scored, real, k), presorted=True
            ),
        }
        if ctx.bon_n <= refs.shape[1]:
            local["win_vs_bon"] = win_rate_vs_bon(rewards, refs, ctx.bon_n)
        if ctx.eval_scorer is not None:
            fitted = fit_prompts(prompt_texts, engines.tokenizer, cfg.data.max_prompt_tokens)
            ended = scored.rollout.ended_with_eos
            local["eval_reward"] = (
                ctx.eval_scorer.score(fitted, scored.responses, ended_with_eos=ended)[: real * k]
                .double()
                .view(real, k)
            )
        gathered = distributed.all_gather_object(
            {"ids": real_ids} | {key: v.tolist() for key, v in local.items()}
        )
        row: dict[str, Any] = {"prompt_ids": [pid for part in gathered for pid in part["ids"]]}
        for key in local:
            per_prompt = [answers for part in gathered for answers in part[key]]
            _stat(row, key, torch.tensor(per_prompt, dtype=torch.float64))
        del row["log_f_se"]
        rows.append(
            EvalRow(
                method=who.label,
                temperature=temperature,
                setting=who.setting,
                run=who.run,
                steps=who.steps,
                bon_n=ctx.bon_n,
                **row,
            )
        )
    return rows


def context(cfg: ExperimentConfig, engines: Engines) -> Context:
    """The shared parts of an evaluation: the cache (checked against the config), the training reward's
    scorer (built here when the engines have none: the demo reuses an offline algorithm's, which never
    scores), the evaluation reward."""
    if engines.scorer is None:
        engines.scorer = build_reward(cfg, engines.sizes)
    return Context(cfg, engines, open_refcache(cfg), eval_scorer(cfg, engines), cfg.vbon.n)


def evaluate(
    cfg: ExperimentConfig, engines: Engines, runs: list[tuple[Policy, Path | None]] | None = None
) -> list[EvalRow]:
    """The whole table for engines that are already built (actor, reference and scorer; the demo reuses
    the trainer's): BoN rows, the fresh reference, then each run (a Policy and the checkpoint to load into
    the actor, None: the actor as it is; default: the actor as "policy")."""
    ctx = context(cfg, engines)
    rows = bon_rows(ctx, load_prompts(cfg.data, "eval").ids)
    rows += policy_rows(ctx, "reference", Policy(FRESH_REFERENCE))
    for who, checkpoint in runs if runs is not None else [(Policy("policy"), None)]:
        if checkpoint is not None:
            load_trained_weights(engines.actor, checkpoint / "actor")
        rows += policy_rows(ctx, "actor", who)
    return mark_front(rows)


def _checkpoint_of(output_dir: Path, required: bool, what: str) -> Path | None:
    checkpoint = distributed.from_main(lambda: resume_checkpoint(output_dir / "checkpoints", "evaluating"))
    if checkpoint is None and required:
        raise VbonError(f"{what}: no verified checkpoint under {output_dir / 'checkpoints'}; train it first")
    return checkpoint


def _run_policy(
    cfg: ExperimentConfig, run_dir: Path, checkpoint: Path | None, label: str, what: str
) -> Policy:
    """The run in `run_dir` at `checkpoint`; `what` names it in errors (`--runs DIR` or this config's)."""
    if checkpoint is None:
        return Policy(label, run=str(run_dir), steps=0)
    state = distributed.from_main(lambda: read_trainer_state(checkpoint))
    recorded = distributed.from_main(lambda: recorded_settings(state, what))  # warns once for old ones
    current = weights_settings(cfg, critic=algorithm_of(cfg).needs.critic)
    check_resume_compatible(recorded, current, what, training=False)
    setting = run_setting(state["config"]) if "config" in state else ""
    return Policy(label, setting=setting, run=str(run_dir), steps=int(state["step"]))


def run(
    cfg: ExperimentConfig,
    run_dirs: list[str | Path] | None = None,
    out: str | Path | None = None,
    labels: list[str] | None = None,
) -> list[EvalRow]:
    """Evaluate the latest checkpoint of this config's run (the untrained actor if there is none), or of
    each run directory in `run_dirs` (labelled by `labels`, default the directory names), all against the
    same reference cache and reward, with the engines built once.

    Inference engines only: no critic, no optimizer, no TensorBoard writer; the actor's weights are read
    from the checkpoint files, so any world size and any training batch sizes work.
    """
    if run_dirs:
        dirs = [Path(d) for d in run_dirs]
        for d in dirs:
            if not d.is_dir():
                raise VbonError(f"--runs {d}: no such run directory")
        labels = labels or [d.name for d in dirs]
        if len(set(labels)) != len(labels):
            raise VbonError(f"--runs: two runs share a name ({', '.join(labels)}); give distinct directories")
    distributed.init_distributed()
    where = check_report_location(cfg, out)
    engines = build_engines(cfg, actor="frozen", reference=True, scorer=True)
    if run_dirs:
        checkpoints = [_checkpoint_of(d, True, f"--runs {d}") for d in dirs]
        runs = [
            (_run_policy(cfg, d, c, label, f"--runs {d}"), c)
            for d, c, label in zip(dirs, checkpoints, labels, strict=True)
        ]
    else:
        own = Path(cfg.train.output_dir)
        checkpoint = _checkpoint_of(own, False, "")
        runs = [(_run_policy(cfg, own, checkpoint, "policy", f"train.output_dir {own}"), checkpoint)]
    rows = evaluate(cfg, engines, runs)
    if distributed.is_main():  # the table first: it is the result, whatever happens to the files
        if run_dirs:
            steps = ", ".join(f"{who.label} after {who.steps} steps" for who, _ in runs)
            print(f"evaluation of {len(runs)} runs ({steps}) ({where}):\n{format_table(rows)}")
        else:
            print(f"evaluation after {runs[0][0].steps} training steps ({where}):\n{format_table(rows)}")
        for line in share_of_bon_gain(rows):
            print(line)
    write_report(cfg, rows, out)
    return rows
