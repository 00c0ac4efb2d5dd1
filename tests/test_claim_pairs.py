"""docs/claims/claim-pairs.yaml: the paired prompts behind the prompt-15 and prompt-17 rows of docs/claims.md.
Each pair must differ in the one thing its row tests, and the shipped file must be what the builder writes."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tokentrail.prompts import load_preset, resolve_prompts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import claims  # benchmarks/claims.py, which builds the set

SHIPPED = ROOT / "docs" / "claims" / "claim-pairs.yaml"


@pytest.fixture(scope="module")
def pairs():
    return resolve_prompts(SHIPPED, None, "unused")


def _by_id(prompt_set):
    return {pid: (category, text) for pid, category, text in
            zip(prompt_set.ids, prompt_set.categories, prompt_set.texts)}


@pytest.mark.parametrize(("number", "words"), [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"), (42, "forty-two"), (90, "ninety"),
    (100, "one hundred"), (115, "one hundred and fifteen"), (999, "nine hundred and ninety-nine"),
])
def test_number_words(number, words):
    assert claims.number_words(number) == words


def test_the_shipped_file_is_what_the_builder_writes(tmp_path):
    claims.write_pairs(tmp_path / "pairs.yaml")
    assert (tmp_path / "pairs.yaml").read_bytes() == SHIPPED.read_bytes()


def _pairs(prompt_set, first: str, second: str) -> list[tuple[str, str]]:
    """(text of `first`, text of `second`) for each pair: ids are STEM-SUFFIX, categories KIND-SUFFIX."""
    found = _by_id(prompt_set)
    first_suffix, second_suffix = first.rsplit("-", 1)[1], second.rsplit("-", 1)[1]
    pairs = []
    for pid, (category, text) in found.items():
        if category == first:
            partner_category, partner = found[pid.removesuffix(first_suffix) + second_suffix]
            assert partner_category == second
            pairs.append((text, partner))
    return pairs


def test_docstring_pairs_differ_only_in_the_triple_quotes(pairs):
    found = _pairs(pairs, "docstring-plain", "docstring-quoted")
    assert len(found) == 47
    for text, quoted in found:
        assert quoted == f"''' {text} '''"


def test_pseudocode_pairs_differ_only_in_how_numbers_are_written(pairs):
    found = _pairs(pairs, "pseudocode-digits", "pseudocode-words")
    assert len(found) == 171
    for text, words in found:
        assert re.search(r"\d", text) and not re.search(r"\d", words)
        # Put the digits back into the words version: the two lines are then the same.
        numbers = iter(re.findall(r"\d+", text))
        pattern = "|".join(sorted({re.escape(claims.number_words(int(n))) for n in re.findall(r"\d+", text)},
                                  key=len, reverse=True))
        assert re.sub(pattern, lambda _, left=numbers: next(left), words) == text


def test_the_axis_ends_come_from_spectrum_large(pairs):
    spectrum = load_preset("spectrum-large")
    known = set(zip(spectrum.categories, spectrum.texts))
    ends = [(c, t) for c, t in zip(pairs.categories, pairs.texts) if c in ("pure-story", "pure-code", "pure-math")]
    assert len(ends) == 300 and set(ends) <= known
