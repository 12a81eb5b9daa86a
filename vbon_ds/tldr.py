"""Reddit TL;DR prompts in the layouts users have, as OpenAI-style queries (layer 3).

    SUBREDDIT: r/{subreddit}

    TITLE: {title}

    POST: {post}

    TL;DR:

Rows come as `subreddit`, `title`, `post` columns (vwxyzjn/summarize_from_feedback_tldr_3_filtered), or as
one text column already in this layout: `prompt` (trl-lib/tldr; CarperAI/openai_summarize_tldr, whose
prompts have single newlines and "TL;DR: ", rebuilt here into the layout above) or `query` (the
preprocessed vwxyzjn sets). The data set keeps the whole post, so prompt ids do not depend on a tokenizer;
`fit_query` cuts the post at a newline (then at a space) to fit the token budget when the prompt is
encoded, as the "N implementation details of RLHF" recipe does, instead of losing the query's start.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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


def format_query(subreddit: str, title: str, post: str) -> str:
    """The OpenAI-style query (the post without its outer whitespace)."""
    return f"SUBREDDIT: r/{subreddit.strip()}\n\nTITLE: {title.strip()}\n\nPOST: {post.strip()}\n\nTL;DR:"


def parse_query(text: str) -> tuple[str, str, str] | None:
    """(subreddit, title, post) of a TL;DR query in the OpenAI or CarperAI layout; None for other text."""
    match = _QUERY.match(text)
    return None if match is None else (match["subreddit"], match["title"], match["post"])


def text_column(columns: Sequence[str], prompt_column: str) -> str | None:
    """The column holding whole queries: `prompt_column`, else `query`; None when there is neither."""
    if prompt_column in columns:
        return prompt_column
    return QUERY_COLUMN if QUERY_COLUMN in columns else None


def is_tldr(columns: Mapping[str, Sequence[Any]], prompt_column: str) -> bool:
    """Whether rows with these columns are TL;DR posts: they have subreddit/title/post, or every text of
    their prompt column (else `query`) is a TL;DR query (data.format=auto)."""
    if all(field in columns for field in FIELDS):
        return True
    column = text_column(list(columns), prompt_column)
    texts = columns[column] if column is not None else []
    return bool(texts) and all(isinstance(t, str) and parse_query(t) is not None for t in texts)


def query_from_row(row: Mapping[str, Any], prompt_column: str, where: str) -> str:
    """The OpenAI-style query of one row (its fields, else its query text rebuilt); `where` names the row."""
    if all(field in row for field in FIELDS):
        values = [row[field] for field in FIELDS]
        for field, value in zip(FIELDS, values, strict=True):
            if not isinstance(value, str) or (field != "subreddit" and not value.strip()):
                raise VbonError(f"{where}: TL;DR field {field!r} is {value!r}, expected non-empty text")
        return format_query(*values)
    column = text_column(list(row), prompt_column)
    if column is None:
        raise VbonError(
            f"{where}: data.format=tldr needs columns {', '.join(FIELDS)}, or {prompt_column!r} or "
            f"{QUERY_COLUMN!r} holding queries (columns: {', '.join(row) or 'none'})"
        )
    text = row[column]
    fields = parse_query(text) if isinstance(text, str) else None
    if fields is None:
        raise VbonError(
            f"{where}: {column!r} is not a TL;DR query (SUBREDDIT: r/...\\nTITLE: ...\\nPOST: ...\\nTL;DR:): "
            f"{str(text)[:60]!r}"
        )
    return format_query(*fields)


def fit_query(text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> str:
    """`text` itself when it fits `max_tokens` or is no TL;DR query; else the query with its post cut at
    the last newline, then the last space, that makes it fit (an empty post if nothing else does)."""
    fields = parse_query(text)
    if fields is None or _num_tokens(tokenizer, text) <= max_tokens:
        return text
    subreddit, title, post = fields
    while post:
        cut = max(post.rfind("\n"), 0) or max(post.rfind(" "), 0)
        post = post[:cut].rstrip()
        query = format_query(subreddit, title, post)
        if _num_tokens(tokenizer, query) <= max_tokens:
            return query
    return format_query(subreddit, title, "")


def _num_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text).input_ids)
