"""The facts the spoken QA corpus asks about: eight relations (keyword -> answer tables), six
phrasings each ("{k}" is the keyword).

The vocabulary is common English words that espeak-ng pronounces plainly. The tables and phrasings
are part of the QA corpus's cache hash (training.demo.qa_corpus.qa_config_hash): editing them
builds a new corpus.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

__all__ = ["RELATIONS", "Relation"]


@dataclass(frozen=True)
class Relation:
    """One kind of fact: keyword -> answer, askable in several phrasings (the held-out rule needs >= 3)."""

    name: str
    facts: tuple[tuple[str, str], ...]  # (keyword, answer)
    templates: tuple[str, ...]


def _both_ways(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple(fact for a, b in pairs for fact in ((a, b), (b, a)))


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


_NUMBERS = (
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
)
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

# Opposites only where the answer is unambiguous in both directions ("old" -> new or young is out).
_OPPOSITES = _both_ways(
    (
        ("hot", "cold"),
        ("big", "small"),
        ("fast", "slow"),
        ("happy", "sad"),
        ("wet", "dry"),
        ("up", "down"),
        ("day", "night"),
        ("black", "white"),
        ("good", "bad"),
        ("rich", "poor"),
        ("full", "empty"),
        ("early", "late"),
        ("left", "right"),
        ("clean", "dirty"),
        ("loud", "quiet"),
        ("yes", "no"),
    )
)

RELATIONS: tuple[Relation, ...] = (
    Relation(
        "opposite",
        _OPPOSITES,
        (
            "what is the opposite of {k}",
            "tell me the opposite of {k}",
            "{k} is the opposite of what",
            "what word means the opposite of {k}",
            "say the opposite of {k}",
            "what is the other side of {k}",
        ),
    ),
    Relation(
        "color",
        (
            ("the sky", "blue"),
            ("grass", "green"),
            ("snow", "white"),
            ("coal", "black"),
            ("a banana", "yellow"),
            ("a tomato", "red"),
            ("a carrot", "orange"),
            ("milk", "white"),
            ("a lemon", "yellow"),
            ("a leaf", "green"),
            ("a cherry", "red"),
            ("chocolate", "brown"),
            ("a pumpkin", "orange"),
            ("a frog", "green"),
            ("a crow", "black"),
            ("the sea", "blue"),
            ("a plum", "purple"),
            ("an elephant", "grey"),
        ),
        (
            "what color is {k}",
            "tell me the color of {k}",
            "what is the color of {k}",
            "{k} is what color",
            "which color is {k}",
            "name the color of {k}",
        ),
    ),
    Relation(
        "number_after",
        tuple(itertools.pairwise(_NUMBERS)),
        (
            "what number comes after {k}",
            "what is {k} plus one",
            "which number follows {k}",
            "{k} plus one is what",
            "tell me the number after {k}",
            "count from {k} what comes next",
        ),
    ),
    Relation(
        "number_before",
        tuple(zip(_NUMBERS[1:], _NUMBERS[:-1])),
        (
            "what number comes before {k}",
            "what is {k} minus one",
            "which number is just before {k}",
            "{k} minus one is what",
            "tell me the number before {k}",
            "count down from {k} what comes next",
        ),
    ),
    Relation(
        "animal_sound",
        tuple(
            (_a(animal), sound)
            for animal, sound in (
                ("dog", "woof"),
                ("cat", "meow"),
                ("cow", "moo"),
                ("duck", "quack"),
                ("pig", "oink"),
                ("lion", "roar"),
                ("owl", "hoot"),
                ("horse", "neigh"),
                ("snake", "hiss"),
                ("bee", "buzz"),
                ("frog", "croak"),
                ("mouse", "squeak"),
                ("wolf", "howl"),
                ("donkey", "hee haw"),
            )
        ),
        (
            "what sound does {k} make",
            "what does {k} say",
            "which sound does {k} make",
            "{k} makes what sound",
            "tell me the sound {k} makes",
            "what noise does {k} make",
        ),
    ),
    Relation(
        "legs",
        tuple(
            (_a(animal), legs)
            for animal, legs in (
                ("dog", "four"),
                ("cat", "four"),
                ("horse", "four"),
                ("cow", "four"),
                ("bird", "two"),
                ("duck", "two"),
                ("chicken", "two"),
                ("spider", "eight"),
                ("ant", "six"),
                ("bee", "six"),
                ("beetle", "six"),
                ("snake", "zero"),
                ("fish", "zero"),
                ("crab", "ten"),
            )
        ),
        (
            "how many legs does {k} have",
            "{k} has how many legs",
            "count the legs of {k}",
            "tell me how many legs {k} has",
            "what number of legs does {k} have",
            "how many legs are on {k}",
        ),
    ),
    Relation(
        "baby_animal",
        tuple(
            (animal, baby)
            for animal, baby in (
                ("dog", "puppy"),
                ("cat", "kitten"),
                ("cow", "calf"),
                ("sheep", "lamb"),
                ("horse", "foal"),
                ("duck", "duckling"),
                ("frog", "tadpole"),
                ("goat", "kid"),
                ("bear", "cub"),
                ("pig", "piglet"),
                ("hen", "chick"),
                ("kangaroo", "joey"),
            )
        ),
        (
            "what is a baby {k} called",
            "what do you call a baby {k}",
            "a baby {k} is called what",
            "tell me the name for a baby {k}",
            "what is the name of a young {k}",
            "what word means a baby {k}",
        ),
    ),
    Relation(
        "day_after",
        tuple(zip(_DAYS, _DAYS[1:] + _DAYS[:1])),
        (
            "what day comes after {k}",
            "which day follows {k}",
            "what is the day after {k}",
            "the day after {k} is what",
            "tell me the day after {k}",
            "if today is {k} what day is tomorrow",
        ),
    ),
)
