"""`vbon evaluate` in process on the tiny preset: every number of the table recomputed directly from the
answers it sampled (captured), the cache and an independent Hugging Face forward pass; one KL axis. Cut-off
answers carry reward.missing_eos_score, so its effect on every column is checked too."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from vbon_ds.commands.demo import demo_config
from vbon_ds.core.bon import bon_kl_bound, bon_kl_from_samples
from vbon_ds.data.refcache import RefRecord, open_refcache
from vbon_ds.data.rewards import register_reward
from vbon_ds.engines.build import build_engines
from vbon_ds.engines.checkpoint import save_checkpoint
from vbon_ds.errors import VbonError
from vbon_ds.jobs import build_refcache, evaluate, report
from vbon_ds.models.tiny_models import make_tiny_causal_lm

CACHE_T, OTHER_T, K, N = 1.0, 0.5, 3, 4
CUT_OFF = 0.375  # reward.missing_eos_score: mid-distribution of the vowel ratios, exact in float32


@register_reward("length_for_tests")
def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(text)) for text in responses]


@contextlib.contextmanager
def world_of_one_not_exported():
    """Evaluating in this process makes a world of one and exports its RANK, MASTER_PORT, ...: the processes
    later tests launch must not inherit them (that port is taken). The process group stays (DeepSpeed keeps
    groups made from it), and so does LOCAL_RANK, which DeepSpeed engines built later in this process read;
    launchers set their own."""
    saved_env = dict(os.environ)
    try:
        yield
    finally:
        local_rank = os.environ.get("LOCAL_RANK", "0")
        os.environ.clear()
        os.environ.update(saved_env, LOCAL_RANK=local_rank)


@pytest.fixture(autouse=True)
def _no_exported_world():
    """`evaluate.run` makes the world of one before it checks its output location."""
    with world_of_one_not_exported():
        yield


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluation of the untrained tiny actor at the cache temperature and another, with the answers
    every sampling call returned, the cache and the model as plain Hugging Face."""
    with world_of_one_not_exported():
        yield _evaluate_captured(tmp_path_factory.mktemp("evaluate"))


def _evaluate_captured(root: Path) -> tuple:
    model_dir = make_tiny_causal_lm(root / "model")
    shutil.copytree(model_dir, root / "run" / "model")
    cfg = demo_config(
        "tiny", root / "run",
        [f"generation.eval_temperatures=[{CACHE_T}, {OTHER_T}]", f"generation.eval_samples={K}",
         "data.max_train_prompts=2", f"vbon.n={N}", "reward.eval_function=length_for_tests",
         "logging.progress_bar=false", f"reward.missing_eos_score={CUT_OFF}"],
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
    return cfg, rows, calls, hf, engines


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
    cfg, rows, calls, hf, _ = evaluated
    cache = open_refcache(cfg)
    from vbon_ds.data.prompts import load_prompts

    ids = load_prompts(cfg.data, "eval").ids
    refs = [cache.record(pid).rewards for pid in ids]
    policy_rows = [row for row in rows if row.temperature is not None]
    fresh, policy = "reference (fresh)", "policy"
    expected = [(fresh, CACHE_T), (fresh, OTHER_T), (policy, CACHE_T), (policy, OTHER_T)]
    assert [(r.method, r.temperature) for r in policy_rows] == expected
    assert [t for t, _ in calls] == [CACHE_T, OTHER_T, CACHE_T, OTHER_T]
    for row, (temperature, scored) in zip(policy_rows, calls, strict=True):
        rewards = scored.rewards.double().tolist()
        ended = scored.rollout.ended_with_eos.tolist()
        assert not all(ended)  # cut-off answers, so the rule below is exercised
        assert all(r == CUT_OFF for r, e in zip(rewards, ended, strict=True) if not e)
        assert (row.reward, row.reward_se) == pytest.approx(per_prompt_stats(rewards), abs=1e-9)
        lengths = [float(len(t)) if e else CUT_OFF for t, e in zip(scored.responses, ended, strict=True)]
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
        # An answer cut off before EOS is at the bottom of log F, -log(M + 1), as training credits it.
        log_f = [
            math.log((1 + (sum(v < r for v in ref) if e else 0)) / (len(ref) + 1))
            for r, ref, e in zip(rewards, owners, ended, strict=True)
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
    cfg, rows, _, _, engines = evaluated
    from vbon_ds.data.prompts import load_prompts

    cache, eos = open_refcache(cfg), engines.tokenizer.eos_token_id
    records = [cache.record(pid) for pid in load_prompts(cfg.data, "eval").ids]
    by_method = {row.method: row for row in rows if row.temperature is None}
    assert list(by_method) == ["reference", "BoN(2)", "BoN(4)", "BoN(8)"]
    for n in (1, 2, 4):
        row = by_method["reference" if n == 1 else f"BoN({n})"]
        best, lengths = [], []
        for record in records:
            subsets = list(itertools.combinations(range(len(record.rewards)), n))
            best.append(statistics.fmean(max(record.rewards[i] for i in s) for s in subsets))
            # cached answers cut off before EOS (the last token is not EOS) are rescored CUT_OFF too
            length = [
                float(len(text)) if ids and ids[-1] == eos else CUT_OFF
                for text, ids in zip(record.texts, record.token_ids, strict=True)
            ]
            per_subset = []  # the evaluation reward of the training reward's choice, ties broken uniformly
            for s in subsets:
                top = max(record.rewards[i] for i in s)
                per_subset.append(statistics.fmean(length[i] for i in s if record.rewards[i] == top))
            lengths.append(statistics.fmean(per_subset))
        assert row.reward == pytest.approx(statistics.fmean(best), abs=1e-6)
        assert row.reward_se == pytest.approx(statistics.stdev(best) / math.sqrt(len(best)), abs=1e-6)
        assert row.eval_reward == pytest.approx(statistics.fmean(lengths), abs=1e-9)
        # KL for the ties the cache shows (what the front uses), beside the tie-free bound
        kls = [bon_kl_from_samples(torch.tensor(record.rewards), n).item() for record in records]
        assert (row.kl, row.kl_bound) == pytest.approx(
            (statistics.fmean(kls), bon_kl_bound(n) if n > 1 else None)
        )
    assert by_method["BoN(4)"].win_vs_bon == 0.5 and by_method["reference"].kl == 0.0


@pytest.mark.slow
def test_front_and_report(evaluated, tmp_path):
    cfg, rows, _, _, _ = evaluated
    # Every row keeps its per-prompt means, on the same prompts, behind its means.
    for row in rows:
        assert sorted(row.prompt_ids) == sorted(rows[0].prompt_ids)
        for stat in ("reward", "kl", "eval_reward"):
            assert statistics.fmean(row.per_prompt[stat]) == pytest.approx(getattr(row, stat), abs=1e-9)

    def paired(a, b, stat):  # mean and SE over prompts of a - b, matched by prompt id
        of_b = dict(zip(b.prompt_ids, b.per_prompt[stat], strict=True))
        diffs = [v - of_b[p] for p, v in zip(a.prompt_ids, a.per_prompt[stat], strict=True)]
        return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))

    def dominates(a, b):  # on the evaluation reward, which is set, outside one SE
        (gain, gain_se), (saving, saving_se) = paired(a, b, "eval_reward"), paired(b, a, "kl")
        return gain > gain_se and saving > saving_se

    undominated = [not any(dominates(other, row) for other in rows if other is not row) for row in rows]
    assert [row.on_front for row in rows] == undominated
    assert any(row.on_front for row in rows)
    report.write_report(cfg, rows, tmp_path / "frontier")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "frontier.md").read_text()
    assert (
        "| eval reward |" in table
        and "win rate vs BoN(4)" in table
        and len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + len(rows) + 1 + 4
    )  # the table (header + rows), then the paired differences to BoN(4) (header + 4 sampled rows)
    assert "r_A - r_B > SE(r_A - r_B)" in table
    assert Path(tmp_path / "frontier.json").stat().st_size > 0


def test_at_most_one_evaluation_reward_and_a_known_one(tmp_path):
    from vbon_ds.config import ConfigError, load_config
    from vbon_ds.engines.build import Engines

    with pytest.raises(ConfigError, match=r"reward\.eval_function: 'vader' and reward\.eval_model='m'"):
        load_config(None, ["reward.eval_function=vader", "reward.eval_model=m"])
    cfg = load_config(None, ["reward.eval_function=nope"])
    with pytest.raises(ConfigError, match=r"reward\.eval_function: unknown reward 'nope' \(known: .*vader"):
        evaluate.eval_scorer(cfg, Engines(tokenizer=None, sizes=None))
    assert evaluate.eval_scorer(load_config(None, []), Engines(tokenizer=None, sizes=None)) is None


def test_share_of_bon_gain_reads_the_cached_reference_and_bon_n():
    def row(method, temperature, reward, kl, **kw):
        return report.EvalRow(method, temperature, reward, kl, win_rate=0.5, bon_n=8, **kw)

    rows = [
        row("reference", None, 0.1, 0.0),
        row("BoN(2)", None, 0.3, 0.15, kl_bound=0.193),
        row("BoN(8)", None, 0.7, 1.1, kl_bound=1.204),
        row(report.FRESH_REFERENCE, 1.0, 0.2, 0.0),
        row("policy", 1.0, 0.4, 0.63),
        row("klrl", 0.7, 0.05, 0.1),
    ]
    assert report.share_of_bon_gain(rows) == [
        "policy (T = 1): reward gain over the reference +0.300, 50% of BoN(8)'s +0.600, at KL 0.630"
        " (BoN(8): 1.100, bound 1.204)",
        "klrl (T = 0.7): reward gain over the reference -0.050, -8% of BoN(8)'s +0.600, at KL 0.100"
        " (BoN(8): 1.100, bound 1.204)",
    ]
    assert report.share_of_bon_gain(rows[3:]) == []  # no cached rows: nothing to compare with


@pytest.mark.slow
def test_table_is_printed_before_the_files_are_written(evaluated, monkeypatch, capsys, tmp_path):
    cfg, engines = evaluated[0], evaluated[4]
    monkeypatch.setattr(evaluate, "build_engines", lambda *args, **kwargs: engines)

    def disk_gone(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(evaluate, "write_report", disk_gone)
    with pytest.raises(OSError, match="disk gone"):
        evaluate.run(cfg, out=tmp_path / "report")
    assert "| reference (fresh) | 1 |" in capsys.readouterr().out


def _not_called(*args, **kwargs):
    raise AssertionError("work started before the output location was checked")


def test_an_unusable_out_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "build_engines", _not_called)
    cfg = demo_config("tiny", tmp_path / "run")
    (tmp_path / "file").write_text("")
    with pytest.raises(
        VbonError, match=r"^--out .*/file/sub: .*/file is a file, not a directory; give another"
    ):
        evaluate.run(cfg, out=tmp_path / "file" / "sub" / "p")
    (tmp_path / "taken.json").mkdir()
    with pytest.raises(VbonError, match=r"^--out .*/taken: cannot write .*/taken\.json; give another --out"):
        evaluate.run(cfg, out=tmp_path / "taken")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_out_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "build_engines", _not_called)
    cfg = demo_config("tiny", tmp_path / "run")
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(VbonError, match=r"^--out .*/ro/p: cannot write .*/ro; give another --out"):
        evaluate.run(cfg, out=tmp_path / "ro" / "p")


def test_evaluating_its_own_run_speaks_of_its_output_dir_and_of_evaluating(tmp_path, monkeypatch, capsys):
    cfg = demo_config("tiny", tmp_path / "run", ["model.lora_rank=4"])
    root = Path(cfg.train.output_dir) / "checkpoints"
    for step in (1, 2):
        state = {"step": step, "config": {"model": {"lora_rank": 8}}}
        save_checkpoint(root, step, {}, state, keep_last=2, run_id="run")
    (root / "latest").write_text("step_00000009")  # dangling
    monkeypatch.setattr(evaluate, "build_engines", lambda *args, **kwargs: None)
    with pytest.raises(VbonError) as err:
        evaluate.run(cfg)
    assert str(err.value).startswith(
        f"train.output_dir {cfg.train.output_dir} was trained with other weights"
    )
    assert "model.lora_rank: checkpoint 8, now 4" in str(err.value)
    assert "--runs" not in str(err.value)
    warning = capsys.readouterr().err
    assert "evaluating the newest verified checkpoint, step_00000002" in warning and "resuming" not in warning


def _stub_context(refs: torch.Tensor, bon_n: int, **engines) -> evaluate.Context:
    cache = SimpleNamespace(rewards_for=lambda ids: refs[: len(ids)].float().sort(-1).values)
    return evaluate.Context(
        demo_config("tiny", Path("/nonexistent/run")), SimpleNamespace(**engines), cache, None, bon_n
    )


def test_bon_of_all_m_cached_answers_has_its_row_and_the_share_line():
    refs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.5, 0.0, 0.7, 0.6]], dtype=torch.float64)
    rows = evaluate.bon_rows(_stub_context(refs, bon_n=4), ["a", "b"])
    assert [row.method for row in rows] == ["reference", "BoN(2)", "BoN(4)"]
    bon4 = rows[-1]
    assert bon4.reward == pytest.approx(statistics.fmean([0.4, 0.7]), abs=1e-7) and bon4.win_rate is None
    assert bon4.kl == pytest.approx(bon_kl_bound(4), abs=1e-12) == bon4.kl_bound  # no ties
    policy = report.EvalRow("policy", 1.0, reward=0.5, kl=0.3, win_rate=0.6, bon_n=4)
    assert report.share_of_bon_gain([*rows, policy])[0].startswith("policy (T = 1): reward gain over the ref")
    assert "| BoN(4) | - |" in report.format_table([*rows, policy])


def test_the_front_takes_bon_at_its_kl_for_the_cache_ties():
    # Tie-heavy rewards (most answers score 0, as VADER's do): BoN(2)'s KL is well below its bound.
    refs = torch.tensor([[0.0] * 6 + [0.5, 1.0]] * 3, dtype=torch.float64)
    rows = {row.method: row for row in evaluate.bon_rows(_stub_context(refs, bon_n=2), ["a", "b", "c"])}
    bon2 = rows["BoN(2)"]
    assert bon2.kl == pytest.approx(bon_kl_from_samples(refs[0], 2).item()) and bon2.kl < bon2.kl_bound - 0.05
    # A policy a little worse than BoN(2) at a KL between the two: dominated by BoN(2) at its actual KL.
    policy = report.EvalRow("policy", 1.0, bon2.reward - 0.05, kl=(bon2.kl + bon2.kl_bound) / 2, win_rate=0.5)
    marked = report.mark_front([*rows.values(), policy])
    assert bon2.on_front and not marked[-1].on_front
    assert f"{bon2.kl:.3f} ± " not in report.format_table(marked)  # one KL per prompt: no spread
    assert f"| {bon2.kl:.3f} (bound {bon2.kl_bound:.3f}) |" in report.format_table(marked)


def test_cached_answers_that_end_in_any_eos_id_of_the_reference_count_as_ended():
    # The reference stops at two EOS ids (the tokenizer's 0 and a chat end token 7, from its generation
    # config): a cached answer ending in 7 ended, and is not rescored as cut off.
    record = RefRecord("a", "say", [0.1, 0.2, 0.3], [[5, 0], [5, 7], [5, 6]], ["x", "y", "z"])
    seen = []

    class Recorder:
        def score(self, prompts, texts, ended_with_eos):
            seen.append(ended_with_eos.tolist())
            return torch.zeros(len(texts))

    ctx = _stub_context(
        torch.tensor([record.rewards]),
        bon_n=2,
        tokenizer=type("Tokenizer", (), {"eos_token_id": 0})(),  # a class instance: weakref-able
        reference=SimpleNamespace(weights_engine=SimpleNamespace(eos_ids=[0, 7])),
    )
    ctx.cache.record, ctx.eval_scorer = (lambda pid: record), Recorder()
    evaluate.rescored_cache(ctx, ["a"])
    assert seen == [[True, True, False]]


def test_mean_log_f_puts_cut_off_answers_at_the_bottom(tmp_path, monkeypatch):
    # Two prompts x K = 2 answers; the cut-off ones carry missing_eos_score = 0.45, mid-distribution.
    cfg = demo_config(
        "tiny", tmp_path / "run",
        ["generation.eval_samples=2", "data.max_eval_prompts=2", "generation.eval_temperatures=[1.0]",
         "reward.missing_eos_score=0.45"],
    )  # fmt: skip
    refs = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]])
    rewards, ended = torch.tensor([0.45, 0.35, 0.45, 0.9]), torch.tensor([False, True, False, True])
    rollout = SimpleNamespace(
        sequences=torch.zeros(4, 3, dtype=torch.long), attention_mask=torch.ones(4, 3, dtype=torch.long),
        response_mask=torch.ones(4, 2, dtype=torch.long), prompt_length=1, ended_with_eos=ended,
    )  # fmt: skip
    scored = SimpleNamespace(rollout=rollout, rewards=rewards, responses=["a"] * 4)
    monkeypatch.setattr(evaluate, "sample_and_score", lambda *args, **kwargs: scored)
    monkeypatch.setattr(evaluate, "policy_logprobs", lambda policy, batch, *rest: torch.zeros(4, 2))
    engines = SimpleNamespace(
        actor=None, reference=None, scorer=None, tokenizer=None, sampler=lambda role: None
    )
    ctx = evaluate.Context(cfg, engines, None, None, 2)
    ctx.cache = SimpleNamespace(rewards_for=lambda ids: refs)
    (row,) = evaluate.policy_rows(ctx, "actor", evaluate.Policy("policy"))
    bottom = -math.log(7)
    expected = [bottom, math.log((1 + 3) / 7), bottom, math.log((1 + 5) / 7)]
    assert row.log_f == pytest.approx(statistics.fmean(expected), abs=1e-6)


@pytest.mark.slow
def test_demo_of_an_offline_algorithm_evaluates_with_a_reward_scorer(tmp_path):
    # Offline algorithms (dpo, ipo, bonbon, bon_sft) train without a reward scorer; the demo's evaluation
    # must build one.
    algo = "dpo"
    env = {
        k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"}
    }
    cmd = [sys.executable, "-m", "vbon_ds", "demo", "--preset", "tiny", "--output-dir", str(tmp_path / algo)]
    settings = [f"algo.name={algo}", "train.steps=1", "data.max_train_prompts=4", "data.max_eval_prompts=2"]
    proc = subprocess.run(
        [*cmd, *(arg for s in settings for arg in ("--set", s))],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| policy | 1 |" in proc.stdout and "| BoN(4) |" in proc.stdout
