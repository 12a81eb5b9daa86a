"""`vbon evaluate` in process on the tiny preset: every number of the table recomputed directly from the
answers it sampled (captured), the cache and an independent Hugging Face forward pass; one KL axis."""

from __future__ import annotations

import itertools
import math
import os
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from vbon_ds.frontier import pareto_front
from vbon_ds.pipelines import build_refcache, evaluate
from vbon_ds.pipelines.demo import demo_config
from vbon_ds.pipelines.engines import build_engines
from vbon_ds.refcache import open_refcache
from vbon_ds.rewards import register_reward
from vbon_ds.tiny import make_tiny_causal_lm

CACHE_T, OTHER_T, K, N = 1.0, 0.5, 3, 4


@register_reward("length_for_tests")
def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(text)) for text in responses]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluation of the untrained tiny actor at the cache temperature and another, with the answers
    every sampling call returned, the cache and the model as plain Hugging Face."""
    saved_env = dict(os.environ)
    try:
        yield _evaluate_captured(tmp_path_factory.mktemp("evaluate"))
    finally:
        # Evaluating here made a world of one in this process and exported its RANK, MASTER_PORT, ...: the
        # processes later tests launch must not inherit them (that port is taken). The process group stays
        # (DeepSpeed keeps groups made from it), and so does LOCAL_RANK, which DeepSpeed engines built
        # later in this process read; launchers set their own.
        local_rank = os.environ.get("LOCAL_RANK", "0")
        os.environ.clear()
        os.environ.update(saved_env, LOCAL_RANK=local_rank)


def _evaluate_captured(root: Path) -> tuple:
    model_dir = make_tiny_causal_lm(root / "model")
    shutil.copytree(model_dir, root / "run" / "model")
    cfg = demo_config(
        "tiny", root / "run",
        [f"generation.eval_temperatures=[{CACHE_T}, {OTHER_T}]", f"generation.eval_samples={K}",
         "data.max_train_prompts=2", f"vbon.n={N}", "reward.eval_function=length_for_tests",
         "logging.progress_bar=false"],
    )  # fmt: skip
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # before any engine exists
    build_refcache.run(cfg)
    calls = []
    real_sample = evaluate.sample_and_score

    def capture(*args, **kwargs):
        scored = real_sample(*args, **kwargs)
        calls.append((kwargs["temperature"], scored))
        return scored

    mp = pytest.MonkeyPatch()
    mp.setattr(evaluate, "sample_and_score", capture)
    try:
        engines = build_engines(cfg, actor="frozen", reference=True, scorer=True)
        rows = evaluate.evaluate(cfg, engines)
    finally:
        mp.undo()
    return cfg, rows, calls, hf


def direct_kl(hf, rollout, temperature: float) -> torch.Tensor:
    """sum over answer tokens of log softmax(logits / T) - log softmax(logits / CACHE_T), full logits."""
    seq, mask, p = rollout.sequences, rollout.attention_mask, rollout.prompt_length
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = hf(input_ids=seq, attention_mask=mask, position_ids=positions).logits[:, p - 1 : -1].double()
    tokens = seq[:, p:, None]
    policy = torch.log_softmax(logits / temperature, -1).gather(-1, tokens)[..., 0]
    reference = torch.log_softmax(logits / CACHE_T, -1).gather(-1, tokens)[..., 0]
    return ((policy - reference) * rollout.response_mask).sum(1)


def per_prompt_stats(values: list[float]) -> tuple[float, float]:
    means = [statistics.fmean(values[i : i + K]) for i in range(0, len(values), K)]
    return statistics.fmean(means), statistics.stdev(means) / math.sqrt(len(means))


@pytest.mark.slow
def test_policy_rows_equal_direct_computations(evaluated):
    cfg, rows, calls, hf = evaluated
    cache = open_refcache(cfg)
    from vbon_ds.data import load_prompts

    ids = load_prompts(cfg.data, "eval").ids
    refs = [cache.record(pid).rewards for pid in ids]
    policy_rows = [row for row in rows if row.temperature is not None]
    fresh, policy = "reference (fresh)", "policy"
    expected = [(fresh, CACHE_T), (fresh, OTHER_T), (policy, CACHE_T), (policy, OTHER_T)]
    assert [(r.method, r.temperature) for r in policy_rows] == expected
    assert [t for t, _ in calls] == [CACHE_T, OTHER_T, CACHE_T, OTHER_T]
    for row, (temperature, scored) in zip(policy_rows, calls, strict=True):
        rewards = scored.rewards.double().tolist()
        assert (row.reward, row.reward_se) == pytest.approx(per_prompt_stats(rewards), abs=1e-9)
        lengths = [float(len(text)) for text in scored.responses]
        assert (row.eval_reward, row.eval_reward_se) == pytest.approx(per_prompt_stats(lengths), abs=1e-9)
        kl = direct_kl(hf, scored.rollout, temperature).tolist()
        assert (row.kl, row.kl_se) == pytest.approx(per_prompt_stats(kl), abs=1e-4)
        owners = [refs[i // K] for i in range(len(rewards))]
        wins = [
            statistics.fmean(1.0 if r > v else 0.5 if r == v else 0.0 for v in ref)
            for r, ref in zip(rewards, owners, strict=True)
        ]
        assert (row.win_rate, row.win_rate_se) == pytest.approx(per_prompt_stats(wins), abs=1e-9)
        vs_bon = [
            statistics.fmean(
                1.0 if r > max(s) else 0.5 if r == max(s) else 0.0 for s in itertools.combinations(ref, N)
            )
            for r, ref in zip(rewards, owners, strict=True)
        ]
        assert (row.win_vs_bon, row.win_vs_bon_se) == pytest.approx(per_prompt_stats(vs_bon), abs=1e-9)
        log_f = [
            math.log((1 + sum(v < r for v in ref)) / (len(ref) + 1))
            for r, ref in zip(rewards, owners, strict=True)
        ]
        assert row.log_f == pytest.approx(statistics.fmean(log_f), abs=1e-6)


@pytest.mark.slow
def test_one_kl_axis_the_reference_at_the_cache_temperature_is_at_zero(evaluated):
    rows = evaluated[1]
    fresh = {row.temperature: row for row in rows if row.method == "reference (fresh)"}
    # Same engine, same temperature, same tokens: exactly 0, not merely small.
    assert fresh[CACHE_T].kl == 0.0
    # At another temperature the KL is to the reference at the cache's temperature, not at its own (0).
    assert fresh[OTHER_T].kl > 0.01
    untrained = {row.temperature: row for row in rows if row.method == "policy"}
    assert untrained[CACHE_T].kl == 0.0 and untrained[OTHER_T].kl > 0.01


@pytest.mark.slow
def test_bon_rows_equal_enumeration_over_the_cache(evaluated):
    cfg, rows, _, _ = evaluated
    from vbon_ds.data import load_prompts

    cache = open_refcache(cfg)
    records = [cache.record(pid) for pid in load_prompts(cfg.data, "eval").ids]
    by_method = {row.method: row for row in rows if row.temperature is None}
    assert list(by_method) == ["reference", "BoN(2)", "BoN(4)", "BoN(8)"]
    for n in (1, 2, 4):
        row = by_method["reference" if n == 1 else f"BoN({n})"]
        best, lengths = [], []
        for record in records:
            subsets = list(itertools.combinations(range(len(record.rewards)), n))
            best.append(statistics.fmean(max(record.rewards[i] for i in s) for s in subsets))
            per_subset = []  # the evaluation reward of the training reward's choice, ties broken uniformly
            for s in subsets:
                top = max(record.rewards[i] for i in s)
                per_subset.append(
                    statistics.fmean(len(record.texts[i]) for i in s if record.rewards[i] == top)
                )
            lengths.append(statistics.fmean(per_subset))
        assert row.reward == pytest.approx(statistics.fmean(best), abs=1e-6)
        assert row.reward_se == pytest.approx(statistics.stdev(best) / math.sqrt(len(best)), abs=1e-6)
        assert row.eval_reward == pytest.approx(statistics.fmean(lengths), abs=1e-9)
    assert by_method["BoN(4)"].win_vs_bon == 0.5 and by_method["reference"].kl == 0.0


@pytest.mark.slow
def test_front_and_report(evaluated, tmp_path):
    cfg, rows, _, _ = evaluated
    ys = [row.eval_reward for row in rows]  # the front is taken on the evaluation reward when it is set
    assert [row.on_front for row in rows] == pareto_front(ys, [row.kl for row in rows])
    assert any(row.on_front for row in rows)
    evaluate.write_report(cfg, rows, tmp_path / "frontier")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "frontier.md").read_text()
    assert (
        "| eval reward |" in table
        and "win rate vs BoN(4)" in table
        and len(table.splitlines()) == 2 + len(rows)
    )
    assert Path(tmp_path / "frontier.json").stat().st_size > 0


def test_at_most_one_evaluation_reward_and_a_known_one(tmp_path):
    from vbon_ds.config import ConfigError, load_config
    from vbon_ds.pipelines.engines import Engines

    with pytest.raises(ConfigError, match=r"reward\.eval_function: 'vader' and reward\.eval_model='m'"):
        load_config(None, ["reward.eval_function=vader", "reward.eval_model=m"])
    cfg = load_config(None, ["reward.eval_function=nope"])
    with pytest.raises(ConfigError, match=r"reward\.eval_function: unknown reward 'nope' \(known: .*vader"):
        evaluate.eval_scorer(cfg, Engines(tokenizer=None, sizes=None))
    assert evaluate.eval_scorer(load_config(None, []), Engines(tokenizer=None, sizes=None)) is None


def test_share_of_bon_gain_reads_the_cached_reference_and_bon_n():
    def row(method, temperature, reward, kl, **kw):
        return evaluate.EvalRow(method, temperature, reward, kl, win_rate=0.5, bon_n=8, **kw)

    rows = [
        row("reference", None, 0.1, 0.0),
        row("BoN(2)", None, 0.3, 0.193, kl_is_bound=True),
        row("BoN(8)", None, 0.7, 1.204, kl_is_bound=True),
        row(evaluate.FRESH_REFERENCE, 1.0, 0.2, 0.0),
        row("policy", 1.0, 0.4, 0.63),
        row("klrl", 0.7, 0.05, 0.1),
    ]
    assert evaluate.share_of_bon_gain(rows) == [
        "policy (T = 1): reward gain over the reference +0.300, 50% of BoN(8)'s +0.600, at KL 0.630"
        " (BoN(8): <= 1.204)",
        "klrl (T = 0.7): reward gain over the reference -0.050, -8% of BoN(8)'s +0.600, at KL 0.100"
        " (BoN(8): <= 1.204)",
    ]
    assert evaluate.share_of_bon_gain(rows[3:]) == []  # no cached rows: nothing to compare with
