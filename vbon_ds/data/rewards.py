"""Rule-based reward functions, registered by name (layer 3).

A reward function maps a batch of (prompt, response) texts to one float per pair:

    @register_reward("my_reward")
    def my_reward(prompts: list[str], responses: list[str]) -> list[float]: ...

and is selected with `reward.function: my_reward` in the experiment config.
"""

from __future__ import annotations

from collections.abc import Callable

from vbon_ds.errors import VbonError

RewardFn = Callable[[list[str], list[str]], list[float]]

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding `fn` to the registry under `name` (names are unique)."""

    def add(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(f"reward function {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return add


def reward_names() -> list[str]:
    """Names of all registered reward functions."""
    return sorted(_REGISTRY)


def get_reward_function(name: str) -> RewardFn:
    """The registered function called `name`, or a VbonError listing the known names."""
    if name not in _REGISTRY:
        raise VbonError(f"reward.function: unknown reward {name!r} (known: {', '.join(reward_names())})")
    return _REGISTRY[name]


@register_reward("vader")
def vader(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound sentiment of the response, in [-1, 1] (positive = more positive sentiment)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise VbonError(
            "reward.function=vader needs the vaderSentiment package: pip install vaderSentiment"
        ) from None
    analyzer = SentimentIntensityAnalyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in responses]


VOWELS = frozenset("aeiouAEIOU")


@register_reward("vowel_ratio")
def vowel_ratio(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of the response's letters that are vowels (0 for a response without letters).

    Dense and deterministic: even a tiny random model moves it within a few updates, which makes it the
    reward of the tiny preset and of the end-to-end tests.
    """
    scores = []
    for text in responses:
        letters = [c for c in text if c.isalpha()]
        scores.append(sum(c in VOWELS for c in letters) / len(letters) if letters else 0.0)
    return scores
