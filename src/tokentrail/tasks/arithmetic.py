"""Arithmetic word problems generated locally, GSM-Symbolic style, each with its pure-math rendering.

A problem is a template filled with random names, items and numbers from a seeded `random.Random`, so the
same seed always gives the same problems on any machine. Every problem carries the arithmetic expression it
encodes (`50 - 12`) and the answer computed from the drawn numbers; the numbers are drawn so that every
intermediate and final value is a positive integer (divisions are exact), because a word problem about
"apples left" with a negative or fractional answer would test the template, not the model.

Answer extraction rule (`extract_answer`), applied to a model's generation:

1. Only the first line with any non-space text counts; generation stops at a newline anyway, and a model
   that rambles on to a second line has given its answer on the first.
2. Thousands separators are removed (`1,234` -> `1234`; only commas followed by exactly three digits).
3. If the line contains an answer marker, only the text after the *last* marker counts. Markers are `=`,
   `answer is`, `answer:` and `is:` (case-insensitive). This makes an echoed equation (`50 - 12 = 38`)
   and "The answer is 38" read as 38, instead of the first operand.
4. The first number in that text is the answer: an optional minus sign directly before the digits, an
   optional decimal part (`38.0` -> 38.0, which equals 38; a sentence's full stop as in `38.` is not a
   decimal part). `3 8` is the number 3: digits separated by a space are two numbers.
5. If the text has no digits at all, an English number word is read (`zero` ... `nineteen`, the tens,
   and hyphenated or spaced compounds like `twenty-five`); only the first one, no "hundred"/"thousand".
6. Otherwise there is no answer (None), which scores as wrong.

Scoring is exact match: the extracted number must equal the integer answer (`38.0` counts, `38.5` does not).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_N_PROBLEMS = 200

# One question/answer frame for both renderings, so the only difference between a word problem and its
# pure-math twin is the question ("Tom has 50 apples ... ?" against "What is 50 - 12?"). In a pilot on the
# embedded model this frame scored best among a few few-shot-free ones; the bare `50 - 12 =` and an
# "Answer: The answer is" frame made it guess a number without working (see docs/steering.md).
WORD_FORMAT = "Question: {question}\nAnswer:"
MATH_FORMAT = "Question: What is {expression}?\nAnswer:"
# The prompting baseline: the same word problem, only asked differently (AxBench found that prompting is the
# baseline representation steering most often fails to beat).
INSTRUCTION_FORMAT = "Question: Compute the arithmetic: {question}\nAnswer:"


@dataclass(frozen=True)
class Problem:
    """One generated problem. `expression` is valid Python arithmetic whose value is `answer`."""

    id: str
    template: str
    steps: int
    question: str
    expression: str
    answer: int

    def word_prompt(self, fmt: str = WORD_FORMAT) -> str:
        return fmt.format(question=self.question, expression=self.expression)

    def math_prompt(self, fmt: str = MATH_FORMAT) -> str:
        return fmt.format(question=self.question, expression=self.expression)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# (name, subject pronoun, object pronoun, possessive)
NAMES = [
    ("Liam", "he", "him", "his"), ("Noah", "he", "him", "his"), ("Omar", "he", "him", "his"),
    ("Ravi", "he", "him", "his"), ("Mateo", "he", "him", "his"), ("Kenji", "he", "him", "his"),
    ("Lucas", "he", "him", "his"), ("Tom", "he", "him", "his"), ("Ahmed", "he", "him", "his"),
    ("Emma", "she", "her", "her"), ("Olivia", "she", "her", "her"), ("Sofia", "she", "her", "her"),
    ("Aisha", "she", "her", "her"), ("Mei", "she", "her", "her"), ("Priya", "she", "her", "her"),
    ("Chloe", "she", "her", "her"), ("Fatima", "she", "her", "her"), ("Lena", "she", "her", "her"),
]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "cards", "shells", "coins", "stamps"]
CONTAINERS = ["boxes", "bags", "packs", "jars", "crates"]


@dataclass(frozen=True)
class _Template:
    """A problem shape: `draw` picks the numbers (in a fixed order, so a seed always gives the same problem);
    `question` and `expression` are format strings over those numbers and the people and things of `_people`."""

    name: str
    steps: int
    draw: Callable[[random.Random], dict[str, int]]
    question: str
    expression: str

    def make(self, rng: random.Random, people: dict[str, str]) -> tuple[str, str]:
        numbers = self.draw(rng)
        return self.question.format(**people, **numbers), self.expression.format(**numbers)


def _people(rng: random.Random) -> dict[str, str]:
    first, second = rng.sample(NAMES, 2)
    return {
        "name": first[0], "he": first[1], "him": first[2], "his": first[3], "other": second[0],
        "item": rng.choice(ITEMS), "box": rng.choice(CONTAINERS),
    }


# Each draw keeps every intermediate and final value a positive integer, and divisions exact (module docstring).
TEMPLATES: list[_Template] = [
    _Template("add", 1, lambda r: {"a": r.randint(10, 99), "b": r.randint(2, 60)},
              "{name} has {a} {item}. {other} gives {him} {b} more. How many {item} does {name} have now?",
              "{a} + {b}"),
    _Template("subtract", 1, lambda r: {"a": (a := r.randint(20, 99)), "b": r.randint(2, a - 2)},
              "{name} has {a} {item} and gives {b} of them to {other}. How many {item} does {name} have left?",
              "{a} - {b}"),
    _Template("multiply", 1, lambda r: {"a": r.randint(2, 12), "b": r.randint(2, 12)},
              "{name} buys {a} {box} of {item}. Each of the {box} holds {b} {item}. "
              "How many {item} does {name} buy in total?",
              "{a} * {b}"),
    _Template("divide", 1, lambda r: {"b": (b := r.randint(2, 9)), "a": b * r.randint(2, 12)},
              "{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?",
              "{a} / {b}"),
    _Template("age", 1, lambda r: {"a": (a := r.randint(15, 80)), "b": r.randint(2, a - 5)},
              "{name} is {a} years old. {other} is {b} years younger. How old is {other}?",
              "{a} - {b}"),
    _Template("speed", 1, lambda r: {"a": r.randint(2, 9) * 10, "b": r.randint(2, 9)},
              "A train travels at {a} kilometers per hour. How many kilometers does it travel in {b} hours?",
              "{a} * {b}"),
    _Template("buy-then-give", 2,
              lambda r: {"a": (a := r.randint(10, 60)), "b": (b := r.randint(2, 40)), "c": r.randint(2, a + b - 2)},
              "{name} has {a} {item}, buys {b} more and then gives {c} to {other}. "
              "How many {item} does {name} have now?",
              "{a} + {b} - {c}"),
    _Template("packs-plus", 2, lambda r: {"a": r.randint(2, 9), "b": r.randint(2, 12), "c": r.randint(2, 30)},
              "{name} already has {c} {item} and buys {a} {box} with {b} {item} in each. "
              "How many {item} does {name} have now?",
              "{a} * {b} + {c}"),
    _Template("wage-minus", 2,
              lambda r: {"a": (a := r.randint(5, 20)), "b": (b := r.randint(2, 8)), "c": r.randint(2, a * b - 2)},
              "{name} earns {a} dollars per hour and works for {b} hours. Then {he} spends {c} dollars. "
              "How many dollars does {name} have left?",
              "{a} * {b} - {c}"),
    _Template("split-plus", 2,
              lambda r: {"b": (b := r.randint(2, 8)), "a": b * r.randint(2, 12), "c": r.randint(2, 20)},
              "{name} splits {a} {item} equally into {b} {box} and then adds {c} more {item} to one of them. "
              "How many {item} are in that one?",
              "{a} / {b} + {c}"),
    _Template("lost-times", 2,
              lambda r: {"a": (a := r.randint(8, 40)), "b": r.randint(2, a - 3), "c": r.randint(2, 5)},
              "{name} had {a} {item} and lost {b} of them. {other} has {c} times as many {item} as {name} has now. "
              "How many {item} does {other} have?",
              "({a} - {b}) * {c}"),
    _Template("two-days", 2, lambda r: {"a": r.randint(10, 50), "b": r.randint(10, 50), "c": r.randint(2, 30)},
              "{name} reads {a} pages on Monday and {b} pages on Tuesday. On Wednesday {he} reads {c} pages. "
              "How many pages does {name} read in the three days?",
              "{a} + {b} + {c}"),
]

_TOKEN = re.compile(r"\s*(\d+|[-+*/()])")


def evaluate(expression: str) -> int:
    """Value of an expression of non-negative integers, + - * / and parentheses, as an exact integer.

    A tiny recursive-descent parser rather than `eval`, so a typo in a template can never run code, and a
    division that is not exact raises instead of silently producing a fraction.
    """
    tokens = _TOKEN.findall(expression)
    if "".join(tokens) != re.sub(r"\s+", "", expression):
        raise ValueError(f"not an arithmetic expression: {expression!r}")
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take() -> str:
        nonlocal position
        if position >= len(tokens):
            raise ValueError(f"{expression!r} ends too early")
        position += 1
        return tokens[position - 1]

    def atom() -> int:
        token = take()
        if token == "(":
            value = expr()
            if take() != ")":
                raise ValueError(f"unbalanced parentheses in {expression!r}")
            return value
        if token.isdigit():
            return int(token)
        raise ValueError(f"unexpected {token!r} in {expression!r}")

    def term() -> int:
        value = atom()
        while peek() in ("*", "/"):
            if take() == "*":
                value *= atom()
            else:
                divisor = atom()
                if value % divisor:
                    raise ValueError(f"{expression!r} divides inexactly")
                value //= divisor
        return value

    def expr() -> int:
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    value = expr()
    if position != len(tokens):
        raise ValueError(f"trailing input in {expression!r}")
    return value


def generate_problems(n: int = DEFAULT_N_PROBLEMS, seed: int = 0) -> list[Problem]:
    """`n` problems, templates used in turn (so one- and two-step problems are balanced), order shuffled."""
    if n < 1:
        raise ValueError(f"need at least one problem, got n={n}")
    rng = random.Random(seed)
    drafts: list[tuple[_Template, str, str, int]] = []
    seen: set[str] = set()
    index = 0
    while len(drafts) < n:
        template = TEMPLATES[index % len(TEMPLATES)]
        question, expression = template.make(rng, _people(rng))
        if question in seen:
            continue  # a duplicate would count one problem twice; draw again from the same template
        seen.add(question)
        index += 1
        answer = evaluate(expression)
        if answer <= 0:
            raise AssertionError(f"template {template.name} produced answer {answer}")
        drafts.append((template, question, expression, answer))
    rng.shuffle(drafts)
    return [
        Problem(id=f"q{i:04d}", template=t.name, steps=t.steps, question=q, expression=e, answer=a)
        for i, (t, q, e, a) in enumerate(drafts)
    ]


# ----------------------------------------------------------------------------------------- answer extraction

_MARKER = re.compile(r"=|answer\s+is|answer\s*:|\bis\s*:", re.IGNORECASE)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?")
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_WORD_VALUE = {word: i for i, word in enumerate(_UNITS)} | {word: 20 + 10 * i for i, word in enumerate(_TENS)}
_WORD_NUMBER = re.compile(
    rf"\b({'|'.join(_TENS)})(?:[\s-]+({'|'.join(_UNITS[1:10])}))?\b|\b({'|'.join(_UNITS)})\b", re.IGNORECASE
)


def extract_answer(generation: str) -> float | None:
    """The number a generation answers with, by the rule in the module docstring; None if there is none."""
    lines = [line for line in generation.splitlines() if line.strip()]
    if not lines:
        return None
    text = _THOUSANDS.sub("", lines[0])
    markers = list(_MARKER.finditer(text))
    if markers:
        text = text[markers[-1].end():]
    number = _NUMBER.search(text)
    if number:
        return float(number.group())
    if re.search(r"\d", text):
        return None
    word = _WORD_NUMBER.search(text)
    if not word:
        return None
    if word.group(1):
        value = _WORD_VALUE[word.group(1).lower()]
        return float(value + (_WORD_VALUE[word.group(2).lower()] if word.group(2) else 0))
    return float(_WORD_VALUE[word.group(3).lower()])


def is_correct(extracted: float | None, answer: int) -> bool:
    """Exact match: 38.0 is 38, 38.5 is not, no answer is wrong."""
    return extracted is not None and extracted == answer
