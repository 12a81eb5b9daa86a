"""Writes vbon_ds/resources/prompts/review_openings.jsonl: 384 templated movie-review openings for the
science sweep (launch/sweep_science.yaml), which needs hundreds of training prompts and at least 64 held out;
the demo's movie_reviews.jsonl has 40 and 8.

    python benchmarks/review_openings.py

Not real reviews: every prompt is one of 24 hand-written openings (in the style of movie_reviews.jsonl)
with one of 16 film descriptions put in. The 4 descriptions in HELD_OUT make the validation split (96
prompts), so no evaluation prompt shares its film with a training prompt (288 prompts); nothing is random.
"""

from __future__ import annotations

import json
from pathlib import Path

OPENINGS = [
    "I went into {film} expecting",
    "The plot of {film}",
    "From the very first scene of {film}, the director",
    "My friends talked me into watching {film}, and",
    "The lead actor's performance in {film}",
    "Halfway through {film}, I realised",
    "I rented {film} on a rainy Sunday afternoon and",
    "The soundtrack of {film}",
    "Everyone told me that {film}",
    "The ending of {film}",
    "I have seen {film} three times now, and",
    "The cinematography in {film}",
    "As a long-time fan of the genre, I found {film}",
    "The dialogue in {film}",
    "I walked out of {film} thinking",
    "The supporting cast of {film}",
    "Watching {film} with my family,",
    "The first twenty minutes of {film}",
    "Critics have called {film}",
    "The special effects in {film}",
    "What surprised me most about {film}",
    "The pacing of {film}",
    "If you are wondering whether to see {film},",
    "Years from now, people will remember {film}",
]
FILMS = [
    "this film",
    "this movie",
    "the sequel",
    "this documentary",
    "this horror movie",
    "this romantic comedy",
    "this war drama",
    "this animated feature",
    "this science fiction epic",
    "this low-budget thriller",
    "this musical",
    "this period piece",
    "this western",
    "this superhero movie",
    "this foreign-language film",
    "this remake",
]
HELD_OUT = ("this documentary", "this musical", "this western", "this remake")
OUT = Path(__file__).resolve().parent.parent / "vbon_ds" / "resources" / "prompts" / "review_openings.jsonl"


def rows() -> list[dict[str, str]]:
    """Every opening with every film, split by film."""
    return [
        {"prompt": opening.format(film=film), "split": "validation" if film in HELD_OUT else "train"}
        for film in FILMS
        for opening in OPENINGS
    ]


if __name__ == "__main__":
    OUT.write_text("".join(json.dumps(row) + "\n" for row in rows()))
    print(f"wrote {OUT}: {len(rows())} prompts")
