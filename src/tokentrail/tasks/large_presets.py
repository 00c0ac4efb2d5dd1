"""Large categorised prompt sets, built offline and reproducibly: `spectrum-large` (the seed's seven spectrum
categories) and `categories-large` (its five first-experiment categories), at least 200 prompts a category.

Every prompt is a short prefix that ends where the next token is interesting, like the seed's, and comes from
one of these sources (each prompt records its own, with the licence):

* `python-stdlib-code`: the first line of a function or class, or a loop or import, from the Python standard
  library's source (PSF licence);
* `python-stdlib-docstrings`: the opening words of standard-library docstrings and `#` comments (PSF licence);
* `debian-fortunes`: the opening words of quotations in Debian's `fortunes` files (literature, love, wisdom,
  people, art; BSD licence, `/usr/share/games/fortunes`, Debian package `fortunes`);
* `tokentrail-templates`: seeded templates with wide vocabularies (math expressions and equations, pseudocode,
  code-flavoured poetry, facts, syllogisms) and the word problems of `tasks.arithmetic` (tokentrail's MIT
  licence).

The builder is deterministic: the same seed, Python version and fortunes files give byte-identical presets. It
drops exact duplicates (case, spacing and punctuation ignored) and near duplicates (two prompts of one category
sharing 80 % or more of their word bigrams), then takes `per_category` prompts per category in a seeded order.
"""

from __future__ import annotations

import ast
import itertools
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokentrail.tasks.arithmetic import generate_problems
from tokentrail.tasks.pseudo_sentences import stdlib_files

__all__ = ["FORTUNES", "LICENCES", "LargePrompt", "build_large_presets", "preset_documents"]

FORTUNES = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ("literature", "love", "wisdom", "people", "art", "education", "men-women", "humorists")
LICENCES = {
    "python-stdlib-code": "PSF-2.0",
    "python-stdlib-docstrings": "PSF-2.0",
    "debian-fortunes": "BSD-3-Clause (Debian package fortunes: the compilation's licence, /usr/share/doc/fortunes/copyright)",
    "tokentrail-templates": "MIT",
}
NEAR_DUPLICATE = 0.8


@dataclass(frozen=True)
class LargePrompt:
    category: str
    text: str
    source: str


# --- sources ---------------------------------------------------------------------------------------------------


def _stdlib_code_and_text() -> tuple[list[str], list[str]]:
    """(code prefixes, docstring and comment prefixes) from the standard library, in file order."""
    code, text = [], []
    for path in stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.For, ast.While, ast.Import, ast.ImportFrom)):
                line = lines[node.lineno - 1].strip()
                if 8 <= len(line) <= 70 and line.isascii():
                    code.append(line)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    words = docstring.split()
                    if len(words) >= 8 and re.match(r"[A-Z][a-z]", words[0]):
                        text.append(" ".join(words[: 6 + len(words) % 5]))
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("# ") and len(stripped.split()) >= 6 and stripped.isascii():
                text.append(" ".join(stripped.split()[:8]))
    return code, text


def _fortune_prefixes() -> list[str]:
    if not FORTUNES.is_dir():
        raise FileNotFoundError(f"{FORTUNES} is missing: install Debian's `fortunes` package (`make setup-presets`)")
    prefixes = []
    for name in FORTUNE_FILES:
        path = FORTUNES / name
        if not path.is_file():
            continue
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            body = entry.split("\n\t\t--")[0].split("\n\t--")[0]
            words = body.split()
            if len(words) >= 8 and words[0][:1].isalpha() and body.isascii():
                prefixes.append(" ".join(words[: 5 + len(words) % 5]))
    return prefixes


# --- templates ----------------------------------------------------------------------------------------------

_VARIABLES = ["x", "y", "n", "t", "z", "a", "b", "k"]
_FUNCTIONS = ["2x", "x^2", "3x^2 + 1", "sin(x)", "e^x", "x^3 - x", "1/x", "ln(x)", "cos(2x)", "4x + 7"]
# Templates: format strings over the vocabularies below; a slot named twice in one template takes one value.
_VOCABULARY: dict[str, list] = {
    "name": ["counter", "total", "index", "balance", "score", "queue", "buffer", "result", "limit", "flag"],
    "item": ["user", "order", "file", "packet", "row", "node", "task", "message", "record", "request"],
    "n": list(range(2, 101)),
    "step": list(range(1, 10)),
    "feeling": ["Love", "Grief", "Hope", "Longing", "Joy", "Fear", "Regret", "Wonder", "Solitude", "Desire"],
    "other": ["Love", "Grief", "Hope", "Longing", "Joy", "Fear", "Regret", "Wonder", "Solitude", "Desire"],
    "mood": ["love", "grief", "hope", "longing", "joy", "fear", "regret", "wonder", "solitude", "desire"],
    "heart": ["heart", "soul", "memory", "silence", "tears", "dream", "night", "moon", "rain", "river"],
    "nature": ["moon", "river", "wind", "forest", "sea", "sky", "stars", "rain", "snow", "mountain"],
    "place": ["moon", "river", "wind", "forest", "sea", "sky", "stars", "rain", "snow", "mountain"],
    "verb": ["whispered", "sang", "wept", "danced", "trembled", "dreamed", "sighed", "waited", "burned", "drifted"],
    "kind": [("men", "man", "mortal"), ("birds", "bird", "winged"), ("cats", "cat", "a mammal"),
             ("squares", "square", "a rectangle"), ("poets", "poet", "a dreamer"), ("metals", "metal", "a conductor"),
             ("roses", "rose", "a flower"), ("whales", "whale", "a mammal"), ("kings", "king", "a ruler")],
    "who": ["Socrates", "Tom", "Alice", "Rex", "Figure A", "Copper", "Bella", "Moby", "Arthur"],
    "p": ["A", "B", "C"], "q": ["D", "E", "F"], "r": ["X", "Y", "Z"],
    "colour": ["Red", "Blue", "Green"], "colour2": ["Black", "White", "Gold"],
    "ground": ["grass", "road", "roof", "garden", "field", "street"],
    "element": ["hydrogen", "helium", "carbon", "nitrogen", "oxygen", "sodium", "iron", "copper", "silver", "gold",
                "mercury", "lead", "uranium", "neon", "calcium", "zinc", "tin", "sulfur", "iodine", "platinum"],
    "planet": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"],
    "invention": ["printing press", "telephone", "light bulb", "steam engine", "telescope", "airplane", "radio",
                  "computer", "compass", "microscope"],
    "person": ["Isaac Newton", "Marie Curie", "Albert Einstein", "Charles Darwin", "Ada Lovelace", "Galileo Galilei",
               "Leonardo da Vinci", "William Shakespeare", "Napoleon Bonaparte", "Julius Caesar", "Cleopatra",
               "Nikola Tesla", "Alan Turing", "Johann Sebastian Bach", "Wolfgang Amadeus Mozart", "Jane Austen",
               "Abraham Lincoln", "Mahatma Gandhi", "Confucius", "Aristotle", "Plato", "Louis Pasteur",
               "Gregor Mendel", "Dmitri Mendeleev", "Michael Faraday", "James Watt", "Rosalind Franklin",
               "Nicolaus Copernicus", "Johannes Kepler", "Ludwig van Beethoven"],
    "largest": ["ocean", "desert", "planet", "country", "lake", "mountain range", "island", "animal", "rainforest",
                "river"],
    "ordinal": ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
                "eleventh", "twelfth", "sixteenth", "twentieth", "thirtieth"],
    "country": ["France", "Japan", "Brazil", "Canada", "Egypt", "India", "Italy", "Kenya", "Mexico", "Norway",
                "Peru", "Spain", "Sweden", "Turkey", "Vietnam", "Chile", "Greece", "Poland", "Ghana", "Nepal"],
}
_TEMPLATES: dict[str, list[str]] = {
    "pseudocode": [
        "IF {item} is valid THEN process {item} ELSE", "REPEAT until {name} is greater than {n}:",
        "SET {name} to zero and INCREMENT by {step}", "FOR EACH {item} IN the list DO",
        "WHILE {name} is less than {n} DO", "READ the next {item} and STORE it in",
        "IF {name} equals {n} THEN RETURN", "INITIALIZE {name} to {n} THEN FOR EACH {item}",
    ],
    "algorithmic-poetry": [
        "class {feeling}({other}): def __init__(self):", "while {heart}.is_breaking(): print('",
        "if ({heart} > 0): return {mood} else: return", "for {heart} in {mood}.memories():",
        "def forget({heart}): return {mood}.", "try: hold({heart}) except {feeling}Error:",
        "import {mood} as", "{heart} = [{mood} for",
    ],
    "creative": [
        "The {nature} {verb} to the", "Once upon a time, beneath the {nature},", "Write a haiku about the {nature}:",
        "In the silence of the {nature},", "Her eyes were like the {nature} that", "The {nature} and the {place}",
    ],
    "history-facts": [
        "The capital of {country} is", "The chemical symbol for {element} is", "The planet {planet} is the",
        "The {invention} was invented by", "The official language of {country} is", "The atomic number of {element} is",
        "{country} is a country in", "The {invention} was first used in", "{person} was born in",
        "{person} is best known for", "The largest {largest} in the world is",
        "The {ordinal} president of the United States was", "The currency of {country} is the", "{person} died in the year",
    ],
    "logic-syllogism": [
        "All {kind[0]} are {kind[2]}. {who} is a {kind[1]}. Therefore,", "{p} > {q} and {q} > {r}, so {p} is",
        "Either {colour} or {colour2}. Not {colour}. Therefore,", "No {kind[0]} are immortal. {who} is a {kind[1]}. So,",
        "If it rains, the {ground} gets wet. It rained. Thus,", "Some {kind[0]} are {kind[2]}. All {kind[2]} things fly. Hence,",
    ],
}
_SLOT = re.compile(r"\{(\w+)")


def _filled(kind: str) -> Callable[[random.Random], str]:
    """A maker of `kind` prompts: a template drawn, then a value for each slot it names (one draw per slot)."""

    def make(rng: random.Random) -> str:
        template = rng.choice(_TEMPLATES[kind])
        slots = dict.fromkeys(_SLOT.findall(template))
        return template.format(**{slot: rng.choice(_VOCABULARY[slot]) for slot in slots})

    return make


def _math(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 30)
    v, f = rng.choice(_VARIABLES), rng.choice(_FUNCTIONS)
    return rng.choice([
        f"{a} * {b} + {c} =", f"{a} + {b} * {c} =", f"({a} - {c}) * {b} =", f"{a * c} / {c} =",
        f"Solve for {v}: {c}{v} - {a} = {b}", f"Calculate the integral of {f}:", f"The derivative of {f} is",
        f"If {c}{v} + {a} = {a + c * b}, then {v} is", f"The square root of {a * a} is",
        f"Simplify: {a}{v} + {b}{v} - {c}{v} =", f"Integrate {f} d{v} from 0 to {c}",
    ])


def _word_problems(seed: int) -> Iterator[str]:
    for problem in generate_problems(600, seed=seed):
        yield problem.question


# --- assembly --------------------------------------------------------------------------------------------------


def _key(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _bigrams(text: str) -> set[tuple[str, str]]:
    words = _key(text).split()
    return set(itertools.pairwise(words)) or {(words[0], "")} if words else set()


def _distinct(candidates: Iterator[tuple[str, str]], limit: int) -> list[tuple[str, str]]:
    """Up to `limit` (text, source) candidates, in order, without exact or near duplicates (module docstring)."""
    kept: list[tuple[str, str]] = []
    seen: set[str] = set()
    index: dict[tuple[str, str], list[int]] = {}
    shingles: list[set[tuple[str, str]]] = []
    for text, source in candidates:
        key = _key(text)
        if not key or key in seen:
            continue
        grams = _bigrams(text)
        rivals = {i for gram in grams for i in index.get(gram, ())}
        if any(len(grams & shingles[i]) / len(grams | shingles[i]) >= NEAR_DUPLICATE for i in rivals):
            continue
        seen.add(key)
        for gram in grams:
            index.setdefault(gram, []).append(len(kept))
        shingles.append(grams)
        kept.append((text, source))
        if len(kept) == limit:
            break
    return kept


def _drawn(make: Callable[[random.Random], str], rng: random.Random, source: str,
           tries: int = 20000) -> Iterator[tuple[str, str]]:
    for _ in range(tries):
        yield make(rng), source


def _shuffled(texts: list[str], rng: random.Random, source: str) -> Iterator[tuple[str, str]]:
    order = list(texts)
    rng.shuffle(order)
    return ((text, source) for text in order)


def _alternating(*streams: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """One from each stream in turn, until all are spent."""
    for group in itertools.zip_longest(*streams):
        yield from (item for item in group if item is not None)


def build_large_presets(seed: int = 0, per_category: int = 200) -> dict[str, list[LargePrompt]]:
    """Both presets, each category with `per_category` prompts. Raises ValueError when a source cannot give that
    many distinct prompts, and FileNotFoundError without Debian's fortunes files."""
    code, text = _stdlib_code_and_text()
    fortunes = _fortune_prefixes()
    rng = random.Random(seed)
    templates = "tokentrail-templates"
    plans: dict[str, list[tuple[str, Iterator[tuple[str, str]]]]] = {
        "spectrum-large": [
            ("pure-code", _shuffled(code, rng, "python-stdlib-code")),
            ("pure-math", _drawn(_math, rng, templates)),
            ("pure-story", _shuffled(fortunes, rng, "debian-fortunes")),
            ("word-problems", ((question, templates) for question in _word_problems(seed))),
            ("docstrings", _shuffled(text, rng, "python-stdlib-docstrings")),
            ("pseudocode", _drawn(_filled("pseudocode"), rng, templates)),
            ("algorithmic-poetry", _drawn(_filled("algorithmic-poetry"), rng, templates)),
        ],
        "categories-large": [
            ("math", _drawn(_math, rng, templates)),
            ("code", _shuffled(code, rng, "python-stdlib-code")),
            ("history-facts", _drawn(_filled("history-facts"), rng, templates)),
            ("creative-poetry", _alternating(_drawn(_filled("creative"), rng, templates, tries=2000),
                                             _shuffled(fortunes, rng, "debian-fortunes"))),
            ("logic-syllogism", _drawn(_filled("logic-syllogism"), rng, templates)),
        ],
    }
    built: dict[str, list[LargePrompt]] = {}
    for name, categories in plans.items():
        prompts: list[LargePrompt] = []
        for category, candidates in categories:
            chosen = _distinct(candidates, per_category)
            if len(chosen) < per_category:
                raise ValueError(f"{name}: {category} has only {len(chosen)} distinct prompts, not {per_category}")
            prompts.extend(LargePrompt(category, text, source) for text, source in chosen)
        built[name] = prompts
    return built


def preset_documents(built: dict[str, list[LargePrompt]], seed: int) -> dict[str, tuple[dict, dict]]:
    """For each preset: the prompt file (name, description, prompts with id, category and text) and its sources
    file (each id's source and licence, and what the build used)."""
    version = ".".join(map(str, sys.version_info[:3]))
    documents = {}
    for name, prompts in built.items():
        counts = Counter(p.category for p in prompts)
        ids = [f"{name}-{i:05d}" for i in range(len(prompts))]
        preset = {
            "name": name,
            "description": f"{len(prompts)} prompts, {len(counts)} categories x {min(counts.values())}, built "
                           f"offline by `tokentrail presets build --seed {seed}` (sources and licences: "
                           f"presets/sources/{name}.yaml)",
            "prompts": [{"id": i, "category": p.category, "text": p.text} for i, p in zip(ids, prompts)],
        }
        sources = {
            "preset": name, "seed": seed, "python": version, "licences": LICENCES,
            "prompts": {i: p.source for i, p in zip(ids, prompts)},
        }
        documents[name] = (preset, sources)
    return documents


def write_large_presets(out_dir: Path, seed: int = 0, per_category: int = 200) -> list[Path]:
    """Build both presets and write `out_dir/NAME.yaml` (a prompt file) and `out_dir/sources/NAME.yaml` for each;
    returns the paths written. The presets that ship were written by this into `tokentrail/presets/`."""
    import yaml

    from tokentrail.atomic import atomic_write_text

    written = []
    for name, (preset, sources) in preset_documents(build_large_presets(seed, per_category), seed).items():
        for path, document in ((Path(out_dir) / f"{name}.yaml", preset),
                               (Path(out_dir) / "sources" / f"{name}.yaml", sources)):
            atomic_write_text(path, yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=1000))
            written.append(path)
    return written
