"""Reddit TL;DR prompts in the layouts users have, as OpenAI-style queries (layer 3).

    SUBREDDIT: r/{subreddit}

    TITLE: {title}

    POST: {post}

    TL;DR:

Rows come as `subreddit`, `title`, `post` columns (vwxyzjn/summarize_from_feedback_tldr_3_filtered), or as
one text column already in this layout: `prompt` (trl-lib/tldr; CarperAI/openai_summarize_tldr, whose
prompts have single newlines and "TL;DR: ", rebuilt here into the layout above) or `query` (the
preprocessed vwxyzjn sets). In every layout a row needs a non-empty title and post. The data set keeps the
whole post, so prompt ids do not depend on a tokenizer; `fit_prompts` cuts the post at a newline (then at a
space) to fit the token budget when the prompt is encoded, as the "N implementation details of RLHF" recipe
does, instead of losing the query's start.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from vbon_ds.errors import VbonError

FIELDS = ("subreddit", "title", "post")
QUERY_COLUMN = "query"
COLUMNS = (*FIELDS, QUERY_COLUMN)
"""Every column a TL;DR row may use (kept when a data set is read)."""

_QUERY = re.compile(
    r"\ASUBREDDIT: r/(?P<subreddit>[^\n]*)\n+TITLE: (?P<title>[^\n]*)\n+POST: (?P<post>.*?)\n+TL;DR:[ \t]*\Z",
    re.DOTALL,
)
_QUERY_SHAPE = r"SUBREDDIT: r/...\nTITLE: ...\nPOST: ...\nTL;DR:"


def format_query(subreddit: str, title: str, post: str) -> str:
    """The OpenAI-style query (the post without its outer whitespace)."""
    return f"SUBREDDIT: r/{subreddit.strip()}\n\nTITLE: {title.strip()}\n\nPOST: {post.strip()}\n\nTL;DR:"


def parse_query(text: str) -> tuple[str, str, str] | None:
    """(subreddit, title, post) of a TL;DR query in the OpenAI or CarperAI layout; None for other text."""
    match = _QUERY.match(text)
    return None if match is None else (match["subreddit"], match["title"], match["post"])


# ---------------------------------------------------------------- layouts of rows


@dataclass(frozen=True)
class Layout:
    """Where a table's rows hold their TL;DR posts, and why they are read that way (for messages)."""

    query_column: str | None
    """The column of whole queries; None when the rows have subreddit/title/post columns."""
    reason: str
    """Why this layout: what data.format=auto saw, or that data.format=tldr asked for it."""

    def describe(self) -> str:
        where = (
            f"queries in column {self.query_column!r}"
            if self.query_column
            else "subreddit/title/post columns"
        )
        return f"TL;DR posts from {where}"


def text_column(columns: Sequence[str], prompt_column: str) -> str | None:
    """The column holding whole queries: `prompt_column`, else `query`; None when there is neither."""
    if prompt_column in columns:
        return prompt_column
    return QUERY_COLUMN if QUERY_COLUMN in columns else None


def tldr_layout(columns: Sequence[str], prompt_column: str) -> Layout:
    """The layout data.format=tldr reads rows with these columns in."""
    if all(field in columns for field in FIELDS):
        return Layout(None, "data.format=tldr")
    column = text_column(columns, prompt_column)
    if column is None:
        raise VbonError(
            f"data.format=tldr needs columns {', '.join(FIELDS)}, or {prompt_column!r} or "
            f"{QUERY_COLUMN!r} holding queries (columns: {', '.join(columns) or 'none'})"
        )
    return Layout(column, "data.format=tldr")


def auto_layout(columns: Mapping[str, Sequence[Any]], prompt_column: str) -> Layout | None:
    """The layout data.format=auto reads these rows in: TL;DR when they have subreddit/title/post columns or
    any text of their prompt column (else `query`) is a TL;DR query; None for plain prompts. Every row must
    then follow the layout chosen, so one malformed row is an error, not a silent switch to plain text."""
    if all(field in columns for field in FIELDS):
        return Layout(None, f"data.format=auto: the rows have columns {', '.join(FIELDS)}")
    column = text_column(list(columns), prompt_column)
    if column is None:
        return None
    for i, text in enumerate(columns[column]):
        if isinstance(text, str) and parse_query(text) is not None:
            return Layout(column, f"data.format=auto: row {i} of column {column!r} is a TL;DR query")
    return None


def query_from_row(row: Mapping[str, Any], layout: Layout, where: str) -> str:
    """The OpenAI-style query of one row read in `layout`; `where` names the row in errors."""
    if layout.query_column is None:
        fields = tuple(row[field] for field in FIELDS)
    else:
        text = row[layout.query_column]
        fields = parse_query(text) if isinstance(text, str) else None
        if fields is None:
            raise VbonError(
                f"{where}: {layout.query_column!r} is not a TL;DR query ({_QUERY_SHAPE}): {str(text)[:60]!r}"
                f"{_hint(layout)}"
            )
    for field, value in zip(FIELDS, fields, strict=True):
        # One rule for every layout: a post to summarise needs a title and a post, a subreddit may be empty.
        if not isinstance(value, str) or (field != "subreddit" and not value.strip()):
            raise VbonError(
                f"{where}: TL;DR field {field!r} is {value!r}, expected non-empty text{_hint(layout)}"
            )
    return format_query(*fields)


def _hint(layout: Layout) -> str:
    if not layout.reason.startswith("data.format=auto"):
        return ""
    return f" ({layout.reason}, so every row must be a TL;DR post; use data.format=plain for plain texts)"


# ---------------------------------------------------------------- fitting the token budget


def fit_query(text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> str:
    """`text` itself when it fits `max_tokens` or is no TL;DR query; else the query with its post cut at
    the last newline, then the last space, that makes it fit (an empty post if nothing else does).

    Token counts grow with the part of the post kept, so the cut is found by bisection over the cut
    points: 1 + log2(number of cut points) tokenizer calls, not one per cut point."""
    fields = parse_query(text)
    if fields is None or _num_tokens(tokenizer, text) <= max_tokens:
        return text
    subreddit, title, post = fields
    ends = _cut_ends(post)
    lo, hi = 0, len(ends) - 1  # ends[-1] == 0: the empty post, kept when nothing longer fits
    while lo < hi:
        mid = (lo + hi) // 2
        if _num_tokens(tokenizer, format_query(subreddit, title, post[: ends[mid]])) <= max_tokens:
            hi = mid
        else:
            lo = mid + 1
    return format_query(subreddit, title, post[: ends[lo]])


_FITTED: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict[tuple[str, int], str]] = (
    weakref.WeakKeyDictionary()
)
"""fit_query's answers per tokenizer, keyed by (text, max_tokens): each prompt is fitted once a process."""


def fit_prompts(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[str]:
    """Every prompt as the model sees it (`fit_query`), fitted once per tokenizer and budget. The one
    prompt-fitting function: encoding (rollouts, the cache, offline rows) and reward scoring use it."""
    memo = _FITTED.setdefault(tokenizer, {})
    fitted = []
    for text in texts:
        if (text, max_tokens) not in memo:
            result = fit_query(text, tokenizer, max_tokens)
            memo[(text, max_tokens)] = memo[(result, max_tokens)] = result  # fitting a fitted prompt: itself
        fitted.append(memo[(text, max_tokens)])
    return fitted


def _cut_ends(post: str) -> list[int]:
    """The ends of the post prefixes fit_query may keep, longest first: before each newline from the last,
    then (no newline left) before each space, each without trailing whitespace; the last is 0. Linear."""
    ends: list[int] = []
    end, separator = len(post), "\n"
    while end > 0:
        cut = post.rfind(separator, 0, end)
        if cut <= 0 and separator == "\n":  # no newline left (one at the start cuts nothing)
            separator = " "
            continue
        end = max(cut, 0)
        while end > 0 and post[end - 1].isspace():  # rstrip, by index
            end -= 1
        ends.append(end)
    return ends or [0]


def _num_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text).input_ids)
