"""The built-in tasks ``demo`` and ``topics``: sentences the project writes itself, from word lists.

``demo``: short movie reviews. Sentences are assembled from subjects, verbs, adjectives and
optional negation or contrast ("not", "but"), which makes the labels need more than one keyword.
Label 1 is positive.

``topics``: one-line news items about sports, food, weather or music (labels 0..3, in that
order), assembled from a subject, an event and an optional time or place. The task's template
is the bare sentence and a line break, with no instruction (see :mod:`lrpt.tasks`): the topic
is easy once asked for, and a soft prompt has to learn to ask. ``make demo`` trains on it.

No external data; the same seed always gives the same rows, and no sentence of the validation or
test split is ever a training sentence (:func:`held_out`).
"""

from __future__ import annotations

import random
import zlib

SUBJECTS = ["the movie", "this film", "the acting", "the plot", "the soundtrack", "the ending", "the cast",
            "the script", "the director's work", "the dialogue", "the pacing", "the visuals"]
POSITIVE = ["wonderful", "brilliant", "moving", "delightful", "superb", "charming", "gripping", "beautiful",
            "clever", "funny", "heartfelt", "excellent"]
NEGATIVE = ["dull", "awful", "boring", "clumsy", "tedious", "messy", "forgettable", "bland", "painful",
            "lazy", "predictable", "terrible"]
OPENERS = ["", "honestly, ", "overall, ", "i thought ", "to be fair, ", "in the end, "]
LINKS = ["was", "felt", "seemed", "is"]

SPLITS = {"train": (1, 2000), "validation": (2, 400), "test": (3, 400)}


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
    return _rows(review, split, n)


# -- topics: (subjects, events, times or places) per topic; every subject fits every event ----------
TOPICS = {
    "sports": (
        ["the striker", "the goalkeeper", "the home side", "the referee", "the coach", "the captain",
         "the young sprinter", "the tennis player", "the boxer", "the cyclist"],
        ["scored twice in the second half", "missed an easy penalty", "won the final on points",
         "was sent off after a rough tackle", "broke the national record", "lost in straight sets",
         "trained hard before the match", "signed a new contract with the club", "came back from injury",
         "celebrated the late winner", "was booed by the away fans", "finished third in the race"],
        ["last night", "on saturday", "at the stadium", "in the league", "this season", "at the olympics"]),
    "food": (
        ["the chef", "my grandmother", "the baker", "the waiter", "the new restaurant", "the cook",
         "my roommate", "the food truck", "the cafe", "the caterer"],
        ["burned the garlic bread", "served a spicy lentil soup", "baked fresh cinnamon rolls",
         "added too much salt to the stew", "ran out of pasta", "made pancakes with blueberries",
         "roasted a chicken with lemon", "forgot to chill the dessert", "fried the onions slowly",
         "sliced the tomatoes for the salad", "offered a free slice of cake", "cooked rice with saffron"],
        ["for dinner", "this morning", "at lunch", "for the party", "in the kitchen", "on sunday"]),
    "weather": (
        ["the forecast", "the storm", "a cold front", "the fog", "the wind", "heavy rain", "the snow",
         "a heatwave", "the thunderstorm", "the morning frost"],
        ["brought hail to the valley", "flooded the lower streets", "kept the temperature below zero",
         "knocked down several trees", "cleared up by the afternoon", "made the roads icy",
         "pushed the temperature above thirty degrees", "covered the hills in white",
         "brought gusts of ninety kilometres an hour", "lifted just before noon",
         "turned the sky dark grey", "left puddles everywhere"],
        ["overnight", "yesterday", "along the coast", "in the north", "this week", "all day"]),
    "music": (
        ["the band", "the drummer", "the singer", "the orchestra", "the guitarist", "the choir",
         "the pianist", "the rapper", "the violinist", "the jazz trio"],
        ["played their new single", "released a second album", "cancelled the rest of the tour",
         "tuned the strings before the show", "sang the chorus out of key", "recorded a song in one take",
         "performed an encore of three songs", "sold out the concert hall", "wrote a ballad about the sea",
         "switched to an acoustic set", "played the symphony too fast", "topped the charts"],
        ["last night", "on friday", "at the festival", "in the studio", "this summer", "on the radio"]),
}
TOPIC_NAMES = list(TOPICS)  # label i is TOPIC_NAMES[i]
NEWS_OPENERS = ["", "apparently ", "i heard that ", "as usual ", "believe it or not, ", "according to my friend, "]


def news_item(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(len(TOPIC_NAMES))
    subjects, events, tails = TOPICS[TOPIC_NAMES[label]]
    text = f"{rng.choice(NEWS_OPENERS)}{rng.choice(subjects)} {rng.choice(events)}"
    if rng.random() < 0.6:
        text += " " + rng.choice(tails)
    return text[0].upper() + text[1:] + ".", label


def topic_rows(split: str, n: int | None = None) -> list[dict]:
    """Rows of ``split`` (train: 2,000, validation: 400 by default) as {sentence, label, idx}."""
    return _rows(news_item, split, n)


def held_out(sentence: str) -> bool:
    """Whether a sentence belongs to the evaluation side (a fifth of all sentences, by CRC-32): the
    splits draw from the same word lists, and without this a validation row could be a training row."""
    return zlib.crc32(sentence.encode()) % 5 == 0


def _rows(make, split: str, n: int | None) -> list[dict]:
    seed, default = SPLITS.get(split, (4, 400))
    rng = random.Random(seed)
    evaluation = split != "train"
    out = []
    for i in range(n or default):
        sentence, label = make(rng)
        while held_out(sentence) != evaluation:  # the other side's sentence: draw again
            sentence, label = make(rng)
        out.append({"sentence": sentence, "label": label, "idx": i})
    return out


BUILTIN = {"demo": demo_rows, "topics": topic_rows}  # a task's data "builtin:NAME" reads BUILTIN[NAME]
