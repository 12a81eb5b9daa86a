"""Reference cache: round trip, multi-rank shards, crash and resume, fingerprint, validation, corruption."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_evaluate import world_of_one_not_exported

from vbon_ds.config import ExperimentConfig, load_config
from vbon_ds.data.refcache import (
    SETTINGS_KEY,
    SHARD_SCHEMA,
    CacheSummary,
    RefCache,
    RefCacheWriter,
    RefRecord,
    done_prompt_ids,
    open_refcache,
    refcache_dir,
    validate_cache,
)
from vbon_ds.data.refcache_fingerprint import (
    FINGERPRINT_FILE,
    cache_fingerprint,
    settings_hash,
)
from vbon_ds.errors import VbonError
from vbon_ds.models.content_digest import ModelNotDownloaded, checkpoint_content

M = 3
FINGERPRINT = {"reference": "tiny-ref", "reward_function": "length", "temperature": 1.0, "num_ref_samples": M}


def record(i: int) -> RefRecord:
    """A record whose draw-order rewards are unsorted and exact in float32."""
    rewards = [float(i), -0.5 * i, 2.25]
    return RefRecord(
        f"p{i}", f"prompt {i}", rewards, [[i, k] for k in range(M)], [f"answer {i}.{k}" for k in range(M)]
    )


def write(
    root: Path, ids: range, *, rank: int = 0, chunk_size: int = 2, fingerprint: dict = FINGERPRINT
) -> None:
    with RefCacheWriter(root, fingerprint, rank=rank, chunk_size=chunk_size) as writer:
        writer.add(record(i) for i in ids)


def write_raw_shard(root: Path, name: str, rows: list[dict]) -> None:
    """A shard written around the writer's checks, under the settings of root's fingerprint.json."""
    settings = settings_hash(json.loads((root / FINGERPRINT_FILE).read_text()))
    schema = SHARD_SCHEMA.with_metadata({SETTINGS_KEY: settings})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / name)


def test_round_trip(tmp_path: Path) -> None:
    write(tmp_path, range(5))
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [
        "shard-rank0-00000.parquet",
        "shard-rank0-00001.parquet",
        "shard-rank0-00002.parquet",
    ]
    cache = RefCache(tmp_path, FINGERPRINT)
    assert (len(cache), cache.m) == (5, M) and "p4" in cache and "p5" not in cache
    rewards = cache.rewards_for(["p4", "p1"])
    assert rewards.dtype == torch.float32
    assert rewards.tolist() == [[-2.0, 2.25, 4.0], [-0.5, 1.0, 2.25]]
    assert cache.record("p3") == record(3)
    assert [r.prompt_id for r in cache.records()] == [f"p{i}" for i in range(5)]
    assert done_prompt_ids(tmp_path) == {f"p{i}" for i in range(5)}
    assert validate_cache(tmp_path, [f"p{i}" for i in range(5)]) == CacheSummary(5, M, 3)


def test_best_of_first_n() -> None:
    rec = RefRecord("p", "x", [1.0, 3.0, 0.0, 3.0], [[]] * 4, [""] * 4)
    assert (rec.best_of(1), rec.best_of(2), rec.best_of(4)) == (0, 1, 1)
    with pytest.raises(ValueError, match=r"n must be in \[1, 4\]"):
        rec.best_of(5)


def test_missing_prompt_is_named(tmp_path: Path) -> None:
    write(tmp_path, range(2))
    cache = RefCache(tmp_path)
    with pytest.raises(VbonError, match=r"1 of 2 prompts are not in the reference cache .* \(e.g. 'p9'\)"):
        cache.rewards_for(["p0", "p9"])
    with pytest.raises(VbonError, match="'p9'"):
        cache.record("p9")
    with pytest.raises(VbonError, match=r"lacks 1 prompts \(e.g. 'p9'\)"):
        validate_cache(tmp_path, ["p0", "p9"])


def test_ranks_write_their_own_shards_and_the_reader_merges_them(tmp_path: Path) -> None:
    write(tmp_path, range(0, 6, 2), rank=0)
    write(tmp_path, range(1, 6, 2), rank=1, chunk_size=5)
    assert {p.name for p in tmp_path.glob("shard-rank1-*")} == {"shard-rank1-00000.parquet"}
    cache = RefCache(tmp_path)
    assert len(cache) == 6
    assert cache.rewards_for(["p5"]).tolist() == [[-2.5, 2.25, 5.0]]


def test_resume_after_a_crash_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    crashed = RefCacheWriter(tmp_path, FINGERPRINT, chunk_size=2)
    crashed.add(record(i) for i in range(5))  # two shards written, p4 still buffered when the run dies
    (tmp_path / ".shard-rank0-00002.parquet.tmp").write_bytes(b"PAR1 half a shard")
    del crashed

    done = done_prompt_ids(tmp_path)
    assert done == {"p0", "p1", "p2", "p3"}
    write(tmp_path, [i for i in range(10) if f"p{i}" not in done])

    assert not list(tmp_path.glob(".*.tmp"))
    assert validate_cache(tmp_path, [f"p{i}" for i in range(10)]).num_prompts == 10
    assert sorted(RefCache(tmp_path).records(), key=lambda r: int(r.prompt_id[1:])) == [
        record(i) for i in range(10)
    ]


def test_writer_leaving_on_error_keeps_buffered_records(tmp_path: Path) -> None:
    bad = RefRecord("nan-prompt", "x", [0.0, float("nan"), 1.0], [[1]] * M, ["a"] * M)
    with (
        pytest.raises(VbonError, match=r"prompt 'nan-prompt': non-finite reward nan"),
        RefCacheWriter(tmp_path, FINGERPRINT, chunk_size=10) as writer,
    ):
        writer.add([record(0), bad])
    assert done_prompt_ids(tmp_path) == {"p0"}


def test_duplicate_prompt_keeps_the_first_shard_and_warns(tmp_path: Path) -> None:
    write(tmp_path, range(2), rank=0)
    with RefCacheWriter(tmp_path, FINGERPRINT, rank=1) as writer:
        writer.add([RefRecord("p1", "prompt 1", [9.0] * M, [[0]] * M, ["dup"] * M)])
    with pytest.warns(
        UserWarning, match=r"'p1' is in shard-rank0-00000.parquet and shard-rank1-00000.parquet"
    ):
        cache = RefCache(tmp_path)
    assert len(cache) == 2 and cache.record("p1") == record(1)
    with pytest.warns(UserWarning, match="'p1'"):
        assert validate_cache(tmp_path).num_prompts == 2


def test_fingerprint_mismatch_names_the_key(tmp_path: Path) -> None:
    write(tmp_path, range(1))
    changed = {**FINGERPRINT, "temperature": 0.7, "top_k": 5}
    pattern = (
        r"temperature: cached 1\.0, now 0\.7; top_k: cached '<absent>', now 5\); set train.refcache_dir to "
        r"another directory, or delete"
    )
    with pytest.raises(VbonError, match=pattern):
        RefCacheWriter(tmp_path, changed)
    with pytest.raises(VbonError, match=r"num_ref_samples: cached 3, now 4"):
        RefCache(tmp_path, {**FINGERPRINT, "num_ref_samples": 4})
    RefCacheWriter(tmp_path, {**FINGERPRINT, "temperature": 1})  # 1 == 1.0: the same setting


def test_no_cache_yet(tmp_path: Path) -> None:
    assert done_prompt_ids(tmp_path / "absent") == set()
    with pytest.raises(VbonError, match=r"no reference cache in .*; run `vbon refcache` first"):
        RefCache(tmp_path)


def test_corrupt_shard_is_named(tmp_path: Path) -> None:
    write(tmp_path, range(4))
    shard = tmp_path / "shard-rank0-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-20])  # truncated, as by a full disk
    for read in (validate_cache, RefCache, done_prompt_ids):
        with pytest.raises(VbonError, match=r"shard .*shard-rank0-00001\.parquet is unreadable"):
            read(tmp_path)


@pytest.mark.parametrize(
    ("rewards", "sorted_rewards", "message"),
    [
        ([0.0, float("inf"), 1.0], [0.0, 1.0, float("inf")], r"'bad': non-finite reward inf"),
        ([0.0, 1.0], [0.0, 1.0], r"'bad': 2 rewards, expected M = 3"),
        ([2.0, 0.0, 1.0], [2.0, 0.0, 1.0], r"'bad': sorted_rewards is not the ascending sort"),
    ],
)
def test_validation_names_the_bad_prompt(
    tmp_path: Path, rewards: list, sorted_rewards: list, message: str
) -> None:
    write(tmp_path, range(2))
    n = len(rewards)
    row = {"prompt_id": "bad", "prompt": "x", "rewards": rewards, "sorted_rewards": sorted_rewards}
    write_raw_shard(
        tmp_path, "shard-rank3-00000.parquet", [{**row, "token_ids": [[1]] * n, "texts": ["a"] * n}]
    )
    with pytest.raises(VbonError, match=r"shard .*shard-rank3-00000\.parquet: prompt " + message):
        validate_cache(tmp_path)


def test_reader_rejects_a_wrong_reward_count(tmp_path: Path) -> None:
    write(tmp_path, range(1))
    row = {"prompt_id": "short", "prompt": "x", "rewards": [1.0], "sorted_rewards": [1.0]}
    write_raw_shard(tmp_path, "shard-rank1-00000.parquet", [{**row, "token_ids": [[1]], "texts": ["a"]}])
    with pytest.raises(VbonError, match=r"prompt 'short' has 1 rewards, expected M = 3"):
        RefCache(tmp_path)


def test_runs_share_one_cache_through_train_refcache_dir(tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"prompt {i}"}) + "\n" for i in range(3)))
    (tmp_path / "actor").mkdir()
    (tmp_path / "actor" / "config.json").write_text("{}")
    models = [
        f"model.actor={tmp_path / 'actor'}",
        "reward.function=vowel_ratio",
        f"vbon.num_ref_samples={M}",
        f"data.source={data}",
    ]
    vbon_run = load_config(None, [*models, f"train.output_dir={tmp_path / 'vbon'}"])
    assert refcache_dir(vbon_run) == tmp_path / "vbon" / "refcache"  # the default: inside the run

    shared = f"train.refcache_dir={tmp_path / 'shared'}"
    vbon_run = load_config(None, [*models, f"train.output_dir={tmp_path / 'vbon'}", shared])
    kl_rl_run = load_config(
        None,
        [*models, f"train.output_dir={tmp_path / 'kl'}", shared, "vbon.objective=kl_rl", "vbon.beta=0.1"],
    )
    with RefCacheWriter(refcache_dir(vbon_run), cache_fingerprint(vbon_run)) as writer:
        writer.add(record(i) for i in range(3))
    assert not (tmp_path / "vbon" / "refcache").exists()
    cache = open_refcache(kl_rl_run)  # the KL-RL run reads the cache the vBoN run wrote
    assert cache.rewards_for(["p2"]).tolist() == [[-1.0, 2.0, 2.25]]


def test_a_cache_made_for_other_prompt_texts_under_the_same_ids_is_refused(tmp_path: Path) -> None:
    write(tmp_path, range(3))
    same = {f"p{i}": f"prompt {i}" for i in range(3)}
    other = {**same, "p1": "a different prompt"}
    assert done_prompt_ids(tmp_path, same) == set(same) and len(RefCache(tmp_path, prompts=same)) == 3
    assert validate_cache(tmp_path, same).num_prompts == 3
    pattern = r"shard-rank0-00000\.parquet: prompt 'p1' was cached for another text \('prompt 1', now 'a diff"
    for read in (done_prompt_ids, lambda root, texts: RefCache(root, prompts=texts), validate_cache):
        with pytest.raises(VbonError, match=pattern):
            read(tmp_path, other)


def test_open_refcache_checks_the_configs_prompt_texts(tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p{i}", "prompt": f"prompt {i}"} for i in range(10)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"data.source={data}", f"train.output_dir={tmp_path / 'run'}"])
    with RefCacheWriter(refcache_dir(cfg), cache_fingerprint(cfg)) as writer:
        writer.add(RefRecord(r["id"], r["prompt"], [0.0] * 32, [[1]] * 32, ["a"] * 32) for r in rows)
    assert len(open_refcache(cfg)) == 10
    rows[4]["prompt"] = "the data set changed"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(VbonError, match=r"prompt 'p4' was cached for another text"):
        open_refcache(cfg)


def test_deleted_fingerprint_does_not_let_other_settings_adopt_the_shards(tmp_path: Path) -> None:
    write(tmp_path, range(3))
    (tmp_path / FINGERPRINT_FILE).unlink()
    with pytest.raises(VbonError, match=r"shard-rank0-00000\.parquet was made under other settings"):
        RefCacheWriter(tmp_path, {**FINGERPRINT, "temperature": 0.5})
    assert not (tmp_path / FINGERPRINT_FILE).exists()
    RefCacheWriter(tmp_path, FINGERPRINT)  # the same settings: the shards are adopted
    assert json.loads((tmp_path / FINGERPRINT_FILE).read_text())["temperature"] == 1.0
    assert validate_cache(tmp_path).num_prompts == 3


def test_fingerprint_is_written_once_the_first_shard_lands(tmp_path: Path) -> None:
    RefCacheWriter(tmp_path, {**FINGERPRINT, "reward_function": "typo"})  # the run dies before a shard
    assert not (tmp_path / FINGERPRINT_FILE).exists()
    with RefCacheWriter(tmp_path, FINGERPRINT, chunk_size=2) as writer:  # the corrected rerun
        writer.add([record(0)])
        assert not (tmp_path / FINGERPRINT_FILE).exists()
        writer.add([record(1)])
        assert json.loads((tmp_path / FINGERPRINT_FILE).read_text())["reward_function"] == "length"
    assert RefCache(tmp_path, FINGERPRINT).rewards_for(["p1"]).tolist() == [[-0.5, 1.0, 2.25]]


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]"])
def test_corrupt_fingerprint_is_one_line_naming_the_file(tmp_path: Path, content: bytes) -> None:
    write(tmp_path, range(1))
    (tmp_path / FINGERPRINT_FILE).write_bytes(content)
    for read in (RefCache, validate_cache, done_prompt_ids, lambda root: RefCacheWriter(root, FINGERPRINT)):
        with pytest.raises(VbonError, match=r"fingerprint\.json is corrupt \(not a JSON object\); delete"):
            read(tmp_path)


def test_full_disk_while_writing_a_shard_names_it(tmp_path: Path, monkeypatch) -> None:
    import errno
    import os

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", full_disk)
    with pytest.raises(
        VbonError, match=r"^no space left on device while writing \S+shard-rank0-00000\.parquet"
    ):
        write(tmp_path, range(2))
    assert done_prompt_ids(tmp_path) == set() and not (tmp_path / FINGERPRINT_FILE).exists()


def save_checkpoint(root: Path, seed: int) -> None:
    """A model directory as the fingerprint sees one: config, tokenizer and random safetensors weights
    (written directly: a ZeRO-3 engine left alive in this process would make transformers save empty ones)."""
    from safetensors.torch import save_file

    root.mkdir(exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (root / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"content": "<|endoftext|>"}]}))
    generator = torch.Generator().manual_seed(seed)
    save_file({"h.0.w": torch.randn(16, 16, generator=generator)}, str(root / "model.safetensors"))


def cache_config(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    """A config whose actor is the checkpoint in tmp_path/actor (made if missing), with 2 prompts."""
    if not (tmp_path / "actor").exists():
        save_checkpoint(tmp_path / "actor", seed=0)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"prompt {i}"}) + "\n" for i in range(2)))
    cfg = load_config(
        None,
        [f"model.actor={tmp_path / 'actor'}", "reward.function=vowel_ratio", f"vbon.num_ref_samples={M}",
         f"data.source={data}", f"train.output_dir={tmp_path / 'run'}", *overrides],
    )  # fmt: skip
    return cfg


def test_a_model_overwritten_in_place_makes_its_cache_stale(tmp_path: Path) -> None:
    cfg = cache_config(tmp_path)
    with RefCacheWriter(refcache_dir(cfg), cache_fingerprint(cfg)) as writer:
        writer.add(record(i) for i in range(2))
    assert len(open_refcache(cfg)) == 2
    stored = json.loads((refcache_dir(cfg) / FINGERPRINT_FILE).read_text())["model_content"]
    assert set(stored["reference"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert set(stored["tokenizer"]) == {"tokenizer.json"}

    save_checkpoint(tmp_path / "actor", seed=1)  # other weights, same path and same file sizes
    pattern = r"made with other settings \(model_content\.reference\.model\.safetensors: cached '\d+:"
    with pytest.raises(VbonError, match=pattern):
        open_refcache(cfg)
    with pytest.raises(VbonError, match=pattern):
        RefCacheWriter(refcache_dir(cfg), cache_fingerprint(cfg))  # `vbon refcache` refuses to complete it


def test_a_cache_serves_configs_that_sample_alike_and_refuses_others(tmp_path: Path) -> None:
    cfg = cache_config(tmp_path)
    with RefCacheWriter(refcache_dir(cfg), cache_fingerprint(cfg)) as writer:
        writer.add(record(i) for i in range(2))
    actor = str(tmp_path / "actor")
    # The reference and the tokenizer default to the actor, so naming it is the same cache; how the policy
    # trains is not what the reference samples depend on.
    alike = cache_config(
        tmp_path, f"model.reference={actor}", f"model.tokenizer={actor}", "vbon.n=2", "train.steps=7"
    )
    assert len(open_refcache(alike)) == 2
    hotter = cache_config(tmp_path, "generation.temperature=1.3")
    with pytest.raises(VbonError, match=r"made with other settings \(temperature: cached 0\.7, now 1\.3\)"):
        open_refcache(hotter)


def test_a_changed_tokenizer_or_reward_is_named(tmp_path: Path) -> None:
    cfg = cache_config(tmp_path)
    with RefCacheWriter(refcache_dir(cfg), cache_fingerprint(cfg)) as writer:
        writer.add(record(i) for i in range(2))
    tokenizer = tmp_path / "actor" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace("<|endoftext|>", "</s>"))
    pattern = r"model_content\.reference\.tokenizer\.json: .*; model_content\.tokenizer\.tokenizer\.json: "
    with pytest.raises(VbonError, match=pattern):
        open_refcache(cfg)

    reward = cache_fingerprint(cache_config(tmp_path, "reward.function=vader"))["model_content"]["reward"]
    assert reward["function"] == "vader" and set(reward["packages"]) == {"vaderSentiment"}
    assert reward["source_sha256"] != cache_fingerprint(cfg)["model_content"]["reward"]["source_sha256"]


def test_a_large_weight_file_is_sampled_and_still_sees_a_retrained_tensor(
    tmp_path: Path, monkeypatch
) -> None:
    import vbon_ds.models.content_digest as content_digest

    monkeypatch.setattr(content_digest, "HEAD_BYTES", 1024)
    monkeypatch.setattr(content_digest, "SAMPLES", 16)
    monkeypatch.setattr(content_digest, "SAMPLE_BYTES", 64)
    size = 1024 + 64 * 1024  # over HEAD_BYTES + SAMPLES * SAMPLE_BYTES: sampled
    weights = tmp_path / "model.safetensors"
    data = bytearray(torch.arange(size, dtype=torch.uint8).numpy().tobytes())
    weights.write_bytes(data)
    before = content_digest.file_digest(weights)
    assert before.startswith(f"{size}:")
    # A "tensor" of size / SAMPLES bytes in the middle, retrained: every byte of it changes.
    start = size // 2
    data[start : start + size // 16] = bytes(b ^ 0xFF for b in data[start : start + size // 16])
    weights.write_bytes(data)
    assert content_digest.file_digest(weights) != before


def test_a_hub_model_is_identified_by_its_cached_commit(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        ModelNotDownloaded, match=r"model 'org/tiny' is neither a local path nor in the local"
    ):
        checkpoint_content("org/tiny")
    repo = tmp_path / "hub" / "models--org--tiny"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert checkpoint_content("org/tiny") == {"hub_commit": "a" * 40}
    assert checkpoint_content("org/tiny", "model.gguf") == {"hub_commit": "a" * 40, "gguf_file": "model.gguf"}
    (repo / "refs" / "main").write_text("b" * 40)  # a newer revision downloaded
    assert checkpoint_content("org/tiny") == {"hub_commit": "b" * 40}


def test_a_cache_that_did_not_record_the_models_content_is_refused(tmp_path: Path) -> None:
    write(tmp_path, range(1))
    stored = json.loads((tmp_path / FINGERPRINT_FILE).read_text())
    (tmp_path / FINGERPRINT_FILE).write_text(json.dumps({**stored, "format_version": 2}))
    with pytest.raises(VbonError, match=r"has format version 2, this vbon_ds reads version 4 \(it does not "
                       r"record the models' content\); delete .* to rebuild it"):  # fmt: skip
        RefCache(tmp_path)


@pytest.mark.slow
def test_refcache_loads_a_model_not_downloaded_yet_before_fingerprinting_it(
    tmp_path: Path, monkeypatch
) -> None:
    from vbon_ds.commands.demo import demo_config
    from vbon_ds.jobs import build_refcache

    cfg = demo_config("tiny", tmp_path / "run", ["data.max_train_prompts=2", "data.max_eval_prompts=2"])
    events = []
    build_engines, fingerprint = build_refcache.build_engines, build_refcache.cache_fingerprint
    monkeypatch.setattr(
        build_refcache, "local_cache_fingerprint", lambda cfg: None
    )  # a hub id not yet cached
    monkeypatch.setattr(
        build_refcache, "build_engines", lambda *a, **k: events.append("load") or build_engines(*a, **k)
    )
    monkeypatch.setattr(
        build_refcache, "cache_fingerprint", lambda cfg: events.append("fingerprint") or fingerprint(cfg)
    )
    with world_of_one_not_exported():  # later tests' launchers must not inherit this world's MASTER_PORT
        summary = build_refcache.run(cfg)
    assert events == ["load", "fingerprint"]  # loading downloads it; the loaded engines then sample
    assert summary.num_prompts == len(open_refcache(cfg))
