"""Prompt loading (every local source kind, split conventions, ids, errors) and the resumable prompt order."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbon_ds.config import DataConfig
from vbon_ds.data.prompts import DEMO_PROMPTS, PromptSampler, load_prompts
from vbon_ds.errors import VbonError

ROWS = [{"prompt": f"Prompt number {i}", "split": "validation" if i % 4 == 0 else "train"} for i in range(12)]
TRAIN = [r["prompt"] for r in ROWS if r["split"] == "train"]
VALIDATION = [r["prompt"] for r in ROWS if r["split"] == "validation"]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format the file suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load(source: Path | str, role: str = "train", **data: object) -> tuple[list[str], list[str]]:
    prompts = load_prompts(DataConfig(source=str(source), **data), role)  # type: ignore[arg-type]
    return prompts.texts, prompts.ids


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_each_file_format_splits_by_its_split_column(tmp_path: Path, suffix: str) -> None:
    path = write_rows(tmp_path / f"prompts{suffix}", ROWS)
    assert load(path)[0] == TRAIN
    assert load(path, "eval")[0] == VALIDATION


def test_json_object_of_columns(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"prompt": ["a b", "c d"], "split": ["train", "validation"]}))
    assert load(path)[0] == ["a b"]


def test_without_split_column_the_last_tenth_is_eval(tmp_path: Path) -> None:
    texts = [f"row {i}" for i in range(25)]
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": t} for t in texts])
    assert load(path)[0] == texts[:23]
    assert load(path, "eval")[0] == texts[23:]
    assert load(write_rows(tmp_path / "few.jsonl", [{"prompt": "x"}, {"prompt": "y"}]), "eval")[0] == ["y"]


def test_a_single_row_leaves_no_training_prompts(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "one.jsonl", [{"prompt": "only"}])
    with pytest.raises(VbonError, match=r"split 'train' has no prompts \(1 rows in all; without splits"):
        load(path)


def test_saved_dataset_dict_and_single_dataset(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"prompt": TRAIN, "other": list(range(len(TRAIN)))}),
            "validation": datasets.Dataset.from_dict({"prompt": VALIDATION, "other": [0] * len(VALIDATION)}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load(tmp_path / "dd")[0] == TRAIN
    assert load(tmp_path / "dd", "eval")[0] == VALIDATION
    with pytest.raises(
        VbonError, match=r"no split 'test' \(splits: train, validation\); set data.eval_split"
    ):
        load(tmp_path / "dd", "eval", eval_split="test")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert load(tmp_path / "ds", "eval")[0] == VALIDATION


def test_hub_id_goes_through_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(source: str) -> datasets.DatasetDict:
        calls.append(source)
        if source != "owner/prompts":
            raise FileNotFoundError(f"Dataset '{source}' doesn't exist on the Hub")
        # "test" is never read: only the requested split is materialised.
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": TRAIN}), "test": None})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(
        "vbon_ds.models.loading.hub_unavailable", lambda: ""
    )  # the hub answers (no offline mode)
    assert load("owner/prompts")[0] == TRAIN
    with pytest.raises(
        VbonError, match=r"'owner/typo' is not a local file .* failed: Dataset 'owner/typo' doesn't"
    ):
        load("owner/typo")
    assert calls == ["owner/prompts", "owner/typo"]


def test_directory_of_files_split_by_file_name(tmp_path: Path) -> None:
    write_rows(tmp_path / "d" / "train-00000-of-00002.parquet", [{"prompt": t} for t in TRAIN[:4]])
    write_rows(tmp_path / "d" / "train-00001-of-00002.parquet", [{"prompt": t} for t in TRAIN[4:]])
    write_rows(tmp_path / "d" / "sub" / "validation.jsonl", [{"prompt": t} for t in VALIDATION])
    assert load(tmp_path / "d")[0] == TRAIN
    assert load(tmp_path / "d", "eval")[0] == VALIDATION
    with pytest.raises(VbonError, match=r"no split 'dev' \(splits: train, validation\)"):
        load(tmp_path / "d", "eval", eval_split="dev")


def test_directory_with_one_split_uses_the_convention(tmp_path: Path) -> None:
    write_rows(tmp_path / "d" / "train.jsonl", ROWS)
    assert load(tmp_path / "d", "eval")[0] == VALIDATION


def test_ids_are_stable_text_hashes_or_the_id_column(tmp_path: Path) -> None:
    rows = [{"prompt": "same"}, {"prompt": "other"}, {"prompt": "same"}, {"prompt": "same"}] * 3
    _, ids = load(write_rows(tmp_path / "p.jsonl", rows), max_train_prompts=4)
    digest = hashlib.sha1(b"same").hexdigest()[:16]
    assert ids == [digest, hashlib.sha1(b"other").hexdigest()[:16], f"{digest}#1", f"{digest}#2"]
    assert load(write_rows(tmp_path / "q.jsonl", rows[2:]), max_train_prompts=1)[1] == [digest]
    with_ids = [
        {"id": 7, "prompt": "a"},
        {"id": "x", "prompt": "b"},
        {"id": 7, "prompt": "c"},
        {"id": 9, "prompt": "d"},
    ]
    assert load(write_rows(tmp_path / "ids.jsonl", with_ids))[1] == ["7", "x", "7#1"]


def test_max_prompts_truncates_each_split(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "p.jsonl", ROWS)
    assert load(path, max_train_prompts=3)[0] == TRAIN[:3]
    assert load(path, "eval", max_eval_prompts=2)[0] == VALIDATION[:2]


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(VbonError, match=r"file not found: .*nope\.jsonl"):
        load(tmp_path / "nope.jsonl")
    with pytest.raises(VbonError, match=r"data\.source is empty"):
        load("")


def test_missing_column_lists_the_columns(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "p.csv", [{"text": "a", "label": "1"}])
    with pytest.raises(
        VbonError, match=r"no column 'prompt' \(columns: text, label\); set data.prompt_column"
    ):
        load(path)


def test_bad_prompts_name_row_and_split(tmp_path: Path) -> None:
    rows = [{"prompt": "fine", "split": "train"}, {"prompt": "ok", "split": "validation"}]
    blank = write_rows(tmp_path / "blank.jsonl", [*rows, {"prompt": "  \n", "split": "validation"}])
    with pytest.raises(VbonError, match=r"blank\.jsonl, split 'validation', row 2: the prompt is empty"):
        load(blank, "eval")
    number = write_rows(tmp_path / "number.jsonl", [*rows, {"prompt": 3, "split": "train"}])
    with pytest.raises(VbonError, match=r"split 'train', row 2: the prompt is int 3, expected text"):
        load(number)
    with pytest.raises(VbonError, match=r"row 1: the 'id' column is empty"):
        load(write_rows(tmp_path / "noid.jsonl", [{"id": 1, "prompt": "a"}, {"id": None, "prompt": "b"}] * 5))


def test_no_prompts(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(VbonError, match=r"empty\.jsonl: split 'train' has no prompts"):
        load(empty)
    with pytest.raises(VbonError, match=r"no row has split == 'test' \(values: train, validation\)"):
        load(write_rows(tmp_path / "p.jsonl", ROWS), "eval", eval_split="test")


def test_invalid_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(VbonError, match=r"p\.jsonl: line 2 is not valid JSON"):
        load(path)


def test_demo_prompts() -> None:
    train, train_ids = load(DEMO_PROMPTS)
    validation, _ = load(DEMO_PROMPTS, "eval")
    assert (len(train), len(validation)) == (40, 8)
    assert len(set(train + validation)) == 48 and len(set(train_ids)) == 40
    assert all(5 <= len(p.split()) <= 12 for p in train + validation)


def test_sampler_is_reproducible_and_reshuffles_each_epoch() -> None:
    draws = PromptSampler(10, seed=3).next_batch(30)
    assert draws == PromptSampler(10, seed=3).next_batch(30)
    assert draws != PromptSampler(10, seed=4).next_batch(30)
    epochs = [draws[0:10], draws[10:20], draws[20:30]]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_sampler_resumes_mid_epoch() -> None:
    uninterrupted = PromptSampler(7, seed=0)
    expected = [uninterrupted.next_batch(3) for _ in range(6)]
    first = PromptSampler(7, seed=0)
    got = [first.next_batch(3) for _ in range(2)]
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = PromptSampler(7, seed=0)
    resumed.load_state_dict(state)
    got += [resumed.next_batch(3) for _ in range(4)]
    assert got == expected


def test_sampler_refuses_a_state_for_other_data() -> None:
    state = PromptSampler(7, seed=0).state_dict()
    with pytest.raises(VbonError, match="for 7 prompts with seed 0, but this run has 8 prompts with seed 0"):
        PromptSampler(8, seed=0).load_state_dict(state)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_non_utf8_data_file_is_one_line(tmp_path: Path, suffix: str) -> None:
    path = write_rows(tmp_path / f"p{suffix}", ROWS)
    path.write_bytes(path.read_bytes().replace(b"Prompt number 3", "Prompt numéro 3".encode("latin-1")))
    with pytest.raises(VbonError, match=rf"^data\.source {path}: not UTF-8 text \(it holds the byte 0xe9\)$"):
        load(path)


@pytest.mark.parametrize("damage", [lambda b: b[:-30], lambda b: b"not a parquet file at all"])
def test_corrupt_parquet_data_file_is_one_line(tmp_path: Path, damage) -> None:
    path = write_rows(tmp_path / "p.parquet", ROWS)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(VbonError, match=rf"^data\.source {path}: not a readable parquet file \("):
        load(path)
