"""The demo's English: sentences from a small template grammar over ~200 words that espeak-ng
pronounces plainly (`make_sentences`, deterministic in its seed)."""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["make_sentences"]


_DETERMINERS = ("the", "a", "my", "your", "his", "her", "our", "their", "this", "that")
_NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_ADJECTIVES = (
    "small",
    "big",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "old",
    "new",
    "happy",
    "little",
    "tall",
    "warm",
    "cold",
    "quiet",
    "loud",
    "bright",
    "dark",
    "soft",
    "young",
    "funny",
    "clever",
    "hungry",
    "tired",
    "brown",
)
_CREATURES = (
    "dog",
    "cat",
    "bird",
    "horse",
    "cow",
    "fish",
    "mouse",
    "child",
    "teacher",
    "doctor",
    "farmer",
    "baby",
    "girl",
    "boy",
    "man",
    "woman",
    "friend",
    "king",
    "queen",
    "cook",
)
# Objects with their plurals (irregular spellings spelled out; no inflection rules needed).
_OBJECTS = {
    "ball": "balls",
    "book": "books",
    "cup": "cups",
    "box": "boxes",
    "hat": "hats",
    "car": "cars",
    "boat": "boats",
    "chair": "chairs",
    "table": "tables",
    "door": "doors",
    "key": "keys",
    "apple": "apples",
    "cake": "cakes",
    "letter": "letters",
    "picture": "pictures",
    "bag": "bags",
    "lamp": "lamps",
    "clock": "clocks",
    "shoe": "shoes",
    "coat": "coats",
    "bottle": "bottles",
    "flower": "flowers",
    "stone": "stones",
}
_PLACES = (
    "house",
    "garden",
    "park",
    "river",
    "school",
    "market",
    "kitchen",
    "forest",
    "city",
    "village",
    "beach",
    "hill",
    "road",
    "bridge",
    "station",
    "shop",
    "farm",
    "library",
    "field",
    "lake",
)
# Verbs as (third person singular, base form).
_INTRANSITIVE = (
    ("runs", "run"),
    ("walks", "walk"),
    ("sleeps", "sleep"),
    ("sings", "sing"),
    ("jumps", "jump"),
    ("waits", "wait"),
    ("swims", "swim"),
    ("sits", "sit"),
    ("plays", "play"),
    ("dances", "dance"),
    ("laughs", "laugh"),
    ("works", "work"),
)
_TRANSITIVE = (
    ("sees", "see"),
    ("likes", "like"),
    ("finds", "find"),
    ("takes", "take"),
    ("opens", "open"),
    ("carries", "carry"),
    ("wants", "want"),
    ("holds", "hold"),
    ("buys", "buy"),
    ("paints", "paint"),
    ("cleans", "clean"),
    ("brings", "bring"),
    ("watches", "watch"),
    ("needs", "need"),
)
_MOTION_PREPOSITIONS = ("to", "into", "across", "from", "near", "behind")
_LOCATION_PREPOSITIONS = ("in", "on", "near", "under", "behind", "by")
_ADVERBS = ("quickly", "slowly", "quietly", "happily", "often", "always", "never", "sometimes", "now")
_TIMES = (
    ("in", "the", "morning"),
    ("in", "the", "evening"),
    ("at", "night"),
    ("every", "day"),
    ("after", "lunch"),
    ("before", "dinner"),
    ("today",),
    ("on", "sunday"),
)
_PLURAL_PRONOUNS = ("we", "they", "you")
_SINGULAR_PRONOUNS = ("he", "she")


def _pick(rng: random.Random, options: Sequence[str]) -> str:
    return options[rng.randrange(len(options))]


def _noun_phrase(rng: random.Random, nouns: Sequence[str], adjective_p: float = 0.5) -> list[str]:
    words = [_pick(rng, _ADJECTIVES)] if rng.random() < adjective_p else []
    words.append(_pick(rng, nouns))
    det = _pick(rng, _DETERMINERS)
    if det == "a" and words[0][0] in "aeiou":
        det = "an"  # "an apple", "an old cat"
    return [det, *words]


def _tail(rng: random.Random, adverbs: bool = True) -> list[str]:
    """An optional adverb or time phrase at the end of a sentence."""
    r = rng.random()
    if r < 0.25 and adverbs:
        return [_pick(rng, _ADVERBS)]
    if r < 0.5:
        return list(_TIMES[rng.randrange(len(_TIMES))])
    return []


def _things() -> tuple[str, ...]:
    return _CREATURES + tuple(_OBJECTS)


def _sentence(rng: random.Random) -> list[str]:
    kind = rng.randrange(9)
    if kind == 0:  # the small dog runs to the red house
        verb = _pick(rng, [v for v, _ in _INTRANSITIVE])
        return [
            *_noun_phrase(rng, _CREATURES),
            verb,
            _pick(rng, _MOTION_PREPOSITIONS),
            *_noun_phrase(rng, _PLACES),
            *_tail(rng),
        ]
    if kind == 1:  # the teacher sleeps quietly
        verb = _pick(rng, [v for v, _ in _INTRANSITIVE])
        return [*_noun_phrase(rng, _CREATURES), verb, *(_tail(rng) or [_pick(rng, _ADVERBS)])]
    if kind == 2:  # my friend finds a blue key in the garden
        verb = _pick(rng, [v for v, _ in _TRANSITIVE])
        words = [*_noun_phrase(rng, _CREATURES), verb, *_noun_phrase(rng, _things())]
        if rng.random() < 0.5:
            words += [_pick(rng, _LOCATION_PREPOSITIONS), *_noun_phrase(rng, _PLACES, 0.3)]
        return words + _tail(rng)
    if kind == 3:  # they watch the old horse every day
        subject = _pick(rng, _PLURAL_PRONOUNS + _SINGULAR_PRONOUNS)
        third, base = _TRANSITIVE[rng.randrange(len(_TRANSITIVE))]
        verb = third if subject in _SINGULAR_PRONOUNS else base
        return [subject, verb, *_noun_phrase(rng, _things()), *_tail(rng)]
    if kind == 4:  # there are three red apples on the table
        if rng.random() < 0.5:
            return [
                "there",
                "is",
                *_noun_phrase(rng, _things()),
                _pick(rng, _LOCATION_PREPOSITIONS),
                *_noun_phrase(rng, _PLACES, 0.3),
            ]
        plural = _OBJECTS[_pick(rng, tuple(_OBJECTS))]
        adjective = [_pick(rng, _ADJECTIVES)] if rng.random() < 0.5 else []
        return [
            "there",
            "are",
            _pick(rng, _NUMBERS),
            *adjective,
            plural,
            _pick(rng, _LOCATION_PREPOSITIONS),
            *_noun_phrase(rng, _PLACES, 0.3),
        ]
    if kind == 5:  # the cat is very hungry today
        very = ["very"] if rng.random() < 0.4 else []
        return [*_noun_phrase(rng, _CREATURES, 0.3), "is", *very, _pick(rng, _ADJECTIVES), *_tail(rng, adverbs=False)]
    if kind == 6:  # where is the red cup / is the dog in the park
        if rng.random() < 0.5:
            return ["where", "is", *_noun_phrase(rng, _things())]
        return [
            "is",
            *_noun_phrase(rng, _things()),
            _pick(rng, _LOCATION_PREPOSITIONS),
            *_noun_phrase(rng, _PLACES, 0.3),
        ]
    if kind == 7:  # can you see the big tree near the river
        words = ["can", "you", _TRANSITIVE[rng.randrange(len(_TRANSITIVE))][1], *_noun_phrase(rng, _things())]
        if rng.random() < 0.4:
            words += [_pick(rng, _LOCATION_PREPOSITIONS), *_noun_phrase(rng, _PLACES, 0.3)]
        return words
    # the cat and the dog play in the park
    base = _INTRANSITIVE[rng.randrange(len(_INTRANSITIVE))][1]
    return [
        *_noun_phrase(rng, _CREATURES, 0.3),
        "and",
        *_noun_phrase(rng, _CREATURES, 0.3),
        base,
        _pick(rng, _LOCATION_PREPOSITIONS),
        *_noun_phrase(rng, _PLACES, 0.0),
    ]


def make_sentences(n: int, seed: int, min_words: int = 4, max_words: int = 10) -> list[str]:
    """`n` distinct sentences (lowercase, no punctuation), deterministic in `seed`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(
                f"the sentence grammar yielded only {len(out)} distinct sentences of "
                f"{min_words}-{max_words} words; asked for {n}"
            )
        words = _sentence(rng)
        if not min_words <= len(words) <= max_words:
            continue
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out
