"""TL;DR data: every layout users have gives the same OpenAI-style queries; posts cut to the token budget."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbon_ds.config import DataConfig
from vbon_ds.data import load_prompts
from vbon_ds.errors import VbonError
from vbon_ds.tiny import make_gpt2_tokenizer
from vbon_ds.tldr import fit_query, format_query, parse_query

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tldr"


def _posts(split: str) -> list[dict]:
    path = FIXTURES / "oai_fields" / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _queries(split: str) -> list[str]:
    return [
        f"SUBREDDIT: r/{p['subreddit']}\n\nTITLE: {p['title']}\n\nPOST: {p['post']}\n\nTL;DR:"
        for p in _posts(split)
    ]


def _parquet(tmp_path: Path) -> Path:
    """The preprocessed vwxyzjn layout (query column) as a parquet directory."""
    for split in ("train", "validation"):
        rows = [
            json.loads(line) for line in (FIXTURES / "oai_query" / f"{split}.jsonl").read_text().splitlines()
        ]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{split}-00000-of-00001.parquet")
    return tmp_path


@pytest.mark.parametrize(
    ("layout", "options"),
    [
        ("oai_fields", {}),  # subreddit / title / post columns
        ("oai_query", {}),  # a `query` column, no `prompt`
        ("parquet", {}),
        ("trl", {}),  # prompt / completion
        ("carperai", {"eval_split": "valid"}),  # prompt / label, single newlines, "TL;DR: "
        ("carperai", {"eval_split": "valid", "format": "tldr"}),
    ],
)
def test_every_layout_gives_the_openai_queries(tmp_path, layout, options):
    source = _parquet(tmp_path) if layout == "parquet" else FIXTURES / layout
    for role, split in (("train", "train"), ("eval", "validation")):
        prompts = load_prompts(DataConfig(source=str(source), **options), role)
        assert prompts.texts == _queries(split)
        if layout in ("oai_fields", "oai_query", "parquet"):
            assert prompts.ids == [p["id"] for p in _posts(split)]
    assert len(load_prompts(DataConfig(source=str(source), **options), "train")) == 24


def test_plain_format_keeps_the_text_and_tldr_format_checks_rows(tmp_path):
    carper = FIXTURES / "carperai"
    raw = load_prompts(DataConfig(source=str(carper), eval_split="valid", format="plain"), "eval").texts
    assert raw[0].startswith("SUBREDDIT: r/movies\nTITLE: ") and raw[0].endswith("\nTL;DR: ")
    good = {"prompt": "SUBREDDIT: r/a\n\nTITLE: t\n\nPOST: p\n\nTL;DR:"}
    rows = [good, {"prompt": "Write a poem about the sea"}, good, good]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = DataConfig(source=str(tmp_path / "bad.jsonl"), format="tldr")
    with pytest.raises(VbonError, match=r"row 1: 'prompt' is not a TL;DR query"):
        load_prompts(bad, "train")
    # auto: one non-query row makes the file plain text
    assert load_prompts(DataConfig(source=str(tmp_path / "bad.jsonl")), "train").texts[0].endswith("TL;DR:")
    (tmp_path / "fields.jsonl").write_text(json.dumps({"subreddit": "a", "title": "t", "post": " "}) + "\n")
    with pytest.raises(VbonError, match=r"row 0: TL;DR field 'post' is ' '"):
        load_prompts(DataConfig(source=str(tmp_path / "fields.jsonl")), "eval")
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(VbonError, match=r"data.format=tldr needs columns subreddit, title, post"):
        load_prompts(DataConfig(source=str(tmp_path / "other.jsonl"), format="tldr"), "eval")


def test_saved_dataset_keeps_the_post_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {split: datasets.Dataset.from_list(_posts(split)) for split in ("train", "validation")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(DataConfig(source=str(tmp_path / "ds")), "eval").texts == _queries("validation")


@pytest.fixture(scope="module")
def gpt2_tokenizer(tmp_path_factory):
    return make_gpt2_tokenizer(tmp_path_factory.mktemp("gpt2"))


def _longest_fitting_cut(post: str, fits) -> str:
    """What the recipe keeps: the longest post prefix ending at a newline that fits, else the longest
    prefix of the first paragraph ending at a space, else nothing."""
    for sep, head in (("\n", post), (" ", post.split("\n")[0])):
        cuts = sorted({head[:k].rstrip() for k, c in enumerate(head) if c == sep}, key=len, reverse=True)
        for cut in cuts:
            if fits(cut):
                return cut
    return ""


def test_fit_query_cuts_the_post_at_a_newline_then_a_space(gpt2_tokenizer):
    def count(text: str) -> int:
        return len(gpt2_tokenizer(text).input_ids)

    cuts_at_space = 0
    for query in _queries("train"):
        subreddit, title, post = parse_query(query)
        full, empty = count(query), count(format_query(subreddit, title, ""))
        assert fit_query(query, gpt2_tokenizer, full) == query  # it fits: unchanged
        for budget in (full - 1, (full + empty) // 2, empty + 5, empty - 1):
            fitted = fit_query(query, gpt2_tokenizer, budget)
            fields = parse_query(fitted)
            assert fields is not None and fields[:2] == (subreddit, title) and fitted.endswith("\n\nTL;DR:")
            want = _longest_fitting_cut(
                post, lambda cut, s=subreddit, t=title, b=budget: count(format_query(s, t, cut)) <= b
            )
            assert fields[2] == want
            assert count(fitted) <= budget or want == ""
            cuts_at_space += "\n" not in want and want not in ("", post.split("\n")[0])
    assert cuts_at_space  # the fixtures exercise both kinds of cut
    assert fit_query("Write a poem about the sea " * 20, gpt2_tokenizer, 5).startswith("Write a poem")
