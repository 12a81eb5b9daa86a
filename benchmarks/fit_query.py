"""Time of fitting a long TL;DR post to the prompt budget (`tldr.fit_query`), now and before issue 24.

    python benchmarks/fit_query.py [--words 1000 10000 100000] [--old-words 1000 3000] [--budget 512]

A post of W words on one line (the worst case: every space is a cut point, no newline to cut at first) is
cut to `--budget` tokens with GPT-2's BPE (`vbon_ds.models.tiny_models.make_gpt2_tokenizer`, Pythia's
tokenizer). Printed
per post: seconds per call (best of 3), tokenizer calls, and the time of a second `fit_prompts` call (served
from the memo). `--old-words` also times the scan fit_query did before (one tokenizer call per cut point,
each on the whole remaining query: quadratic in the post's length); it takes minutes beyond a few thousand
words. Results: benchmarks/RESULTS.md, "Fitting long TL;DR posts".
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

from vbon_ds.data.tldr import fit_prompts, fit_query, format_query, parse_query
from vbon_ds.models.tiny_models import make_gpt2_tokenizer

WORDS = [
    "the", "and", "my", "I", "was", "he", "she", "we", "they", "to", "of", "a", "in", "that", "it", "is",
    "for", "on", "with", "but", "so", "this", "have", "not", "just", "about", "when", "what", "like", "be",
    "know", "would", "time", "really", "because", "friends", "boyfriend", "work", "months", "told", "feel",
]  # fmt: skip


class CountingTokenizer:
    """Counts calls to the wrapped tokenizer."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, text, **kwargs):
        self.calls += 1
        return self.inner(text, **kwargs)


def long_query(words: int) -> str:
    rng = random.Random(0)
    return format_query("relationships", "A long post", " ".join(rng.choice(WORDS) for _ in range(words)))


def old_fit_query(text: str, tokenizer, max_tokens: int) -> str:
    """fit_query before issue 24: try every cut, longest first, tokenizing the whole query each time."""
    fields = parse_query(text)
    if fields is None or len(tokenizer(text).input_ids) <= max_tokens:
        return text
    subreddit, title, post = fields
    while post:
        cut = max(post.rfind("\n"), 0) or max(post.rfind(" "), 0)
        post = post[:cut].rstrip()
        query = format_query(subreddit, title, post)
        if len(tokenizer(query).input_ids) <= max_tokens:
            return query
    return format_query(subreddit, title, "")


def timed(fit, query: str, tokenizer, budget: int, repeats: int) -> tuple[float, int, str]:
    """(best seconds of `repeats` calls, tokenizer calls per call, the fitted query)."""
    best, counting = float("inf"), CountingTokenizer(tokenizer)
    for _ in range(repeats):
        counting.calls = 0
        start = time.perf_counter()
        fitted = fit(query, counting, budget)
        best = min(best, time.perf_counter() - start)
    return best, counting.calls, fitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--old-words", type=int, nargs="*", default=[1000, 3000])
    parser.add_argument("--budget", type=int, default=512)
    args = parser.parse_args()
    tokenizer = make_gpt2_tokenizer(tempfile.mkdtemp())
    print(f"fit_query to {args.budget} tokens, a post of W words on one line (GPT-2 BPE)")
    for words in args.words:
        query = long_query(words)
        seconds, calls, fitted = timed(fit_query, query, tokenizer, args.budget, repeats=3)
        fit_prompts([query], tokenizer, args.budget)
        start = time.perf_counter()
        assert fit_prompts([query], tokenizer, args.budget) == [fitted]
        memo = time.perf_counter() - start
        tokens = len(tokenizer(fitted).input_ids)
        print(
            f"now:    W={words:>6}: {seconds:.4f} s/call, {calls} tokenizer calls, fitted to {tokens} "
            f"tokens; fit_prompts again (memo): {memo * 1e6:.0f} us"
        )
    for words in args.old_words:
        query = long_query(words)
        seconds, calls, fitted = timed(old_fit_query, query, tokenizer, args.budget, repeats=1)
        same = "same cut" if fitted == fit_query(query, tokenizer, args.budget) else "a different cut"
        print(f"before: W={words:>6}: {seconds:.2f} s/call, {calls} tokenizer calls ({same} as now)")


if __name__ == "__main__":
    main()
