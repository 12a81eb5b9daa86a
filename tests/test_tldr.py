"""TL;DR data: every layout users have gives the same OpenAI-style queries; posts cut to the token budget."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vbon_ds.algorithms.offline import ReferenceLogProbs
from vbon_ds.algorithms.onpolicy import TrainingInputs
from vbon_ds.algorithms.registry import ALGORITHMS
from vbon_ds.algorithms.rollout import encode_prompts, sample_and_score
from vbon_ds.batching import batch_sizes
from vbon_ds.config import DataConfig, load_config
from vbon_ds.data import prompts as data_module
from vbon_ds.data.prompts import PromptSet, load_prompts
from vbon_ds.data.refcache import RefRecord
from vbon_ds.data.tldr import fit_prompts, fit_query, format_query, parse_query
from vbon_ds.engines.build import Engines
from vbon_ds.engines.policy import Rollout
from vbon_ds.errors import VbonError
from vbon_ds.models.tiny_models import make_gpt2_tokenizer

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
    (tmp_path / "fields.jsonl").write_text(json.dumps({"subreddit": "a", "title": "t", "post": " "}) + "\n")
    with pytest.raises(VbonError, match=r"row 0: TL;DR field 'post' is ' '"):
        load_prompts(DataConfig(source=str(tmp_path / "fields.jsonl")), "eval")
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(VbonError, match=r"data.format=tldr needs columns subreddit, title, post"):
        load_prompts(DataConfig(source=str(tmp_path / "other.jsonl"), format="tldr"), "eval")


LAYOUTS = {  # fixture directory -> the column of whole queries (None: subreddit/title/post columns)
    "oai_fields": None,
    "oai_query": "query",
    "trl": "prompt",
    "carperai": "prompt",
}


def _copy_with_row(tmp_path: Path, layout: str, index: int, edit) -> Path:
    """The layout's training file with row `index` changed by `edit(row, column)` (column as in LAYOUTS)."""
    rows = [json.loads(line) for line in (FIXTURES / layout / "train.jsonl").read_text().splitlines()]
    edit(rows[index], LAYOUTS[layout])
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "train.jsonl"


@pytest.fixture
def capture_data_lines(capsys):
    """stdout with data/prompts.py's once-a-process lines printed again (other tests may have loaded these
    files)."""
    data_module._say_once.cache_clear()
    return capsys


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_auto_says_which_layout_it_chose_and_why(capture_data_lines, layout):
    load_prompts(DataConfig(source=str(FIXTURES / layout)), "train")
    column = LAYOUTS[layout]
    where = f"queries in column {column!r}" if column else "subreddit/title/post columns"
    why = f"row 0 of column {column!r} is a TL;DR query" if column else "the rows have columns subreddit"
    out = capture_data_lines.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("data: "))
    assert f"TL;DR posts from {where} (data.format=auto: {why}" in line


def test_auto_says_when_it_reads_plain_prompts(tmp_path, capture_data_lines):
    (tmp_path / "plain.jsonl").write_text(json.dumps({"prompt": "Write a poem about the sea"}) + "\n")
    load_prompts(DataConfig(source=str(tmp_path / "plain.jsonl")), "eval")
    assert "plain prompts from column 'prompt' (data.format=auto: no row of it is a TL;DR query" in (
        capture_data_lines.readouterr().out
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_auto_refuses_a_row_that_breaks_the_layout_it_chose(tmp_path, layout):
    def drop_post_marker(row: dict, column: str | None) -> None:
        if column is None:
            del row["post"]
        else:
            row[column] = row[column].replace("POST: ", "")

    source = _copy_with_row(tmp_path, layout, 3, drop_post_marker)
    column = LAYOUTS[layout]
    broken = f"'{column}' is not a TL;DR query" if column else "TL;DR field 'post' is None"
    with pytest.raises(VbonError, match=rf"row 3: {broken}") as err:
        load_prompts(DataConfig(source=str(source)), "train")
    assert "use data.format=plain" in str(err.value) and "data.prompt_column" not in str(err.value)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("data_format", ["auto", "tldr"])
def test_an_empty_post_is_refused_in_every_layout(tmp_path, layout, data_format):
    def empty_post(row: dict, column: str | None) -> None:
        if column is None:
            row["post"] = "  "
        else:
            row[column] = row[column].replace(parse_query(row[column])[2], "  ")

    source = _copy_with_row(tmp_path, layout, 3, empty_post)
    with pytest.raises(VbonError, match=r"row 3: TL;DR field 'post' is '.*', expected non-empty text"):
        load_prompts(DataConfig(source=str(source), format=data_format), "train")


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


class CountingTokenizer:
    """A tokenizer that records what it is called on; every other attribute is the wrapped tokenizer's."""

    def __init__(self, inner) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "calls", [])

    def __call__(self, text, **kwargs):
        self.calls.append(text)
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)


def _long_query(first_line_words: int, lines: int) -> str:
    """A TL;DR query whose post is one long first line, then many short lines."""
    first = " ".join(f"word{i}" for i in range(first_line_words))
    rest = "".join(f"\nline {i} of the post." for i in range(lines))
    return format_query("relationships", "A very long post", first + rest)


@pytest.mark.parametrize(("first_line_words", "lines", "budget"), [(600, 0, 64), (40, 300, 200)])
def test_fit_query_calls_the_tokenizer_a_logarithmic_number_of_times(
    gpt2_tokenizer, first_line_words, lines, budget
):
    query = _long_query(first_line_words, lines)
    subreddit, title, post = parse_query(query)
    counting = CountingTokenizer(gpt2_tokenizer)
    fitted = fit_query(query, counting, budget)
    cut_points = first_line_words + lines
    assert len(counting.calls) <= 2 + math.ceil(math.log2(cut_points))  # the old scan: one call per cut

    def fits(cut: str) -> bool:
        return len(gpt2_tokenizer(format_query(subreddit, title, cut)).input_ids) <= budget

    assert parse_query(fitted) == (subreddit, title, _longest_fitting_cut(post, fits))
    assert ("\n" in parse_query(fitted)[2]) == bool(lines)  # each case cuts where it means to


def test_fit_prompts_fits_each_prompt_once(gpt2_tokenizer):
    gpt2_tokenizer.pad_token = gpt2_tokenizer.eos_token
    long, short = _long_query(300, 0), _queries("train")[0]
    counting = CountingTokenizer(gpt2_tokenizer)
    first = fit_prompts([long, short, long], counting, 64)
    fitting_calls = len(counting.calls)
    fitted_long, fitted_short = (fit_query(text, gpt2_tokenizer, 64) for text in (long, short))
    assert first == [fitted_long, fitted_short, fitted_long]
    assert fit_prompts([short, long, *first], counting, 64) == [first[1], first[0], *first]
    encode_prompts(counting, [long, short], 64)
    assert counting.calls[fitting_calls:] == [[first[0], first[1]]]  # only the encoding: no fitting again
    assert fitting_calls <= 2 + 2 * math.ceil(math.log2(300))


class RecordingSampler:
    """A policy whose generate records the prompt ids it is given and answers each with `answer`."""

    def __init__(self, answer: list[int]) -> None:
        self.answer, self.prompts = answer, []

    def generate(self, ids, mask, **_):
        self.prompts += [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
        answer = torch.tensor([self.answer] * len(ids))
        return Rollout(
            sequences=torch.cat([ids, answer], 1),
            attention_mask=torch.cat([mask, torch.ones_like(answer)], 1),
            response_mask=torch.ones_like(answer),
            prompt_length=ids.shape[1],
            ended_with_eos=torch.ones(len(ids), dtype=torch.bool),
        )


class RecordingReference:
    """A reference policy (response_logprobs only) that records the prompt ids of the rows it scores."""

    def __init__(self) -> None:
        self.prompts = []

    def response_logprobs(self, sequences, attention_mask, prompt_length, temperature, *_):
        rows = zip(sequences[:, :prompt_length], attention_mask[:, :prompt_length], strict=True)
        self.prompts += [row[m.bool()].tolist() for row, m in rows]
        return torch.zeros(sequences.shape[0], sequences.shape[1] - prompt_length)


@pytest.mark.parametrize("algo", ["bon_sft", "dpo"])
def test_offline_rows_hold_the_prompt_the_cache_was_sampled_with(gpt2_tokenizer, algo):
    """A post longer than data.max_prompt_tokens: the cache's answers follow the fitted query (its post cut),
    and the offline rows (policy and reference) must condition on those very ids, SUBREDDIT and TITLE kept."""
    gpt2_tokenizer.pad_token = gpt2_tokenizer.eos_token
    cfg = load_config(
        None,
        [f"algo.name={algo}", "vbon.n=2", "vbon.num_ref_samples=2", "algo.samples_per_prompt=1",
         "train.prompts_per_step=1", "train.micro_batch_size=1", "data.max_prompt_tokens=48"],
    )  # fmt: skip
    query = _long_query(100, 20)
    assert len(gpt2_tokenizer(query).input_ids) > 48
    answer = gpt2_tokenizer(" a short summary").input_ids
    sampler = RecordingSampler(answer)
    scorer = SimpleNamespace(score=lambda prompts, texts, ended_with_eos: torch.zeros(len(texts)))
    sample_and_score(sampler, scorer, gpt2_tokenizer, [query] * 2, cfg.generation, max_prompt_tokens=48)
    sampled = sampler.prompts[0]
    assert gpt2_tokenizer.decode(sampled).startswith("SUBREDDIT: r/relationships\n\nTITLE: A very long post")

    reference = RecordingReference()
    engines = Engines(tokenizer=gpt2_tokenizer, sizes=batch_sizes(cfg, 1), reference=reference)
    record = RefRecord("p0", query, [0.0, 1.0], [answer, answer], ["x", "y"])
    cache = SimpleNamespace(record=lambda prompt_id: record)
    prompts = PromptSet("train", ["p0"], [query])
    inputs = TrainingInputs(engines, cfg, prompts, cache, ReferenceLogProbs(), beta=0.0)
    exp = ALGORITHMS[algo].experience(inputs, [0], torch.Generator().manual_seed(0))
    for role, batch in exp.batches.items():
        width = batch.prompt_length
        rows = zip(batch.sequences[:, :width], batch.attention_mask[:, :width], strict=True)
        assert [row[m.bool()].tolist() for row, m in rows] == [sampled], role
    assert reference.prompts and all(ids == sampled for ids in reference.prompts)
