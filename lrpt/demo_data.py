"""The built-in ``demo`` task: short movie reviews the project writes itself, from word lists.

No external data: sentences are assembled from subjects, verbs, adjectives and optional
negation or contrast ("not", "but"), which makes the labels need more than one keyword.
Label 1 is positive. The same seed always gives the same rows.
"""

from __future__ import annotations

import random

SUBJECTS = ["the movie", "this film", "the acting", "the plot", "the soundtrack", "the ending", "the cast",
            "the script", "the director's work", "the dialogue", "the pacing", "the visuals"]
POSITIVE = ["wonderful", "brilliant", "moving", "delightful", "superb", "charming", "gripping", "beautiful",
            "clever", "funny", "heartfelt", "excellent"]
NEGATIVE = ["dull", "awful", "boring", "clumsy", "tedious", "messy", "forgettable", "bland", "painful",
            "lazy", "predictable", "terrible"]
OPENERS = ["", "honestly, ", "overall, ", "i thought ", "to be fair, ", "in the end, "]
LINKS = ["was", "felt", "seemed", "is"]


def review(rng: random.Random) -> tuple[str, int]:
    subject, link = rng.choice(SUBJECTS), rng.choice(LINKS)
    label = rng.random() < 0.5
    words = POSITIVE if label else NEGATIVE
    adj = rng.choice(words)
    form = rng.random()
    if form < 0.35:  # negation flips the adjective's polarity
        adj = rng.choice(NEGATIVE if label else POSITIVE)
        text = f"{subject} {link} not {adj}"
    elif form < 0.7:  # contrast: the clause after "but" decides
        other = rng.choice(NEGATIVE if label else POSITIVE)
        text = f"{subject} {link} {other}, but {rng.choice(SUBJECTS)} {rng.choice(LINKS)} {adj}"
    else:
        text = f"{subject} {link} {rng.choice(['', 'really ', 'quite ', 'very '])}{adj}"
    return (rng.choice(OPENERS) + text + ".").capitalize(), int(label)


def demo_rows(split: str, n: int | None = None) -> list[dict]:
    """Rows of ``split`` (train: 2,000, validation: 400 by default) as {sentence, label, idx}."""
    seed, default = {"train": (1, 2000), "validation": (2, 400), "test": (3, 400)}.get(split, (4, 400))
    rng = random.Random(seed)
    out = []
    for i in range(n or default):
        sentence, label = review(rng)
        out.append({"sentence": sentence, "label": label, "idx": i})
    return out
