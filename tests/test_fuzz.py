"""Property tests: whatever text goes into a prompt file or the store comes out identical."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokentrail.prompts import load_prompt_file
from tokentrail.store import TraceStore
from tokentrail.tracing import Trace

# Any unicode but NUL (refused on purpose) and lone surrogates (not encodable as UTF-8).
characters = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
texts = st.text(characters, min_size=1, max_size=40).filter(lambda t: t.strip())
# Categories are names: control characters (and U+2028/U+2029) are refused in them on purpose.
name_characters = st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"))
categories = st.text(name_characters, min_size=1, max_size=12).filter(lambda c: c.strip() == c and c)
records = st.lists(st.tuples(categories, texts), min_size=1, max_size=6, unique=True)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write_and_load(suffix: str, content: str):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"prompts{suffix}"
        path.write_text(content, encoding="utf-8", newline="")
        return load_prompt_file(path)


@FUZZ
@given(records)
def test_yaml_round_trip(rows):
    # PyYAML writes NEL and friends raw with allow_unicode, and YAML then reads them as line breaks.
    content = yaml.safe_dump({"prompts": [{"category": c, "text": t} for c, t in rows]}, allow_unicode=False)
    loaded = write_and_load(".yaml", content)
    assert loaded.texts == [t for _, t in rows] and loaded.categories == [c for c, _ in rows]


@FUZZ
@given(records)
def test_json_round_trip(rows):
    content = json.dumps([{"category": c, "text": t} for c, t in rows], ensure_ascii=False)
    loaded = write_and_load(".json", content)
    assert loaded.texts == [t for _, t in rows] and loaded.categories == [c for c, _ in rows]


@FUZZ
@given(records)
def test_csv_round_trip(rows):
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["category", "prompt"])
    writer.writerows(rows)
    loaded = write_and_load(".csv", buffer.getvalue())
    assert loaded.texts == [t for _, t in rows] and loaded.categories == [c for c, _ in rows]


# A line of a text file holds no control characters but tabs (refused on purpose, naming the line).
line_characters = st.one_of(name_characters, st.just("\t"))
single_line = st.text(line_characters, min_size=1, max_size=40).filter(
    lambda t: t.strip() and not t.lstrip().startswith("#"))
line_category = categories.filter(lambda c: len(c.splitlines()) == 1 and c == c.splitlines()[0])


@FUZZ
@given(st.lists(st.tuples(line_category, single_line), min_size=1, max_size=6, unique=True))
def test_text_round_trip(rows):
    content = "".join(f"# {c}\n{t}\n" for c, t in rows)
    loaded = write_and_load(".txt", content)
    assert loaded.texts == [t for _, t in rows] and loaded.categories == [c for c, _ in rows]


def fake_trace(prompt_texts: list[str], token_strings: list[list[str]], seed: int) -> Trace:
    """A Trace with random arrays: the store must keep them bit for bit, whatever the text."""
    rng = np.random.default_rng(seed)
    n, layers, hidden, k = len(prompt_texts), 3, 4, 2
    return Trace(
        prompt_ids=[f"p{i}" for i in range(n)], prompts=prompt_texts, categories=["c"] * n, labels=[""] * n,
        states=rng.standard_normal((n, layers, hidden)).astype(np.float32),
        final_states=rng.standard_normal((n, hidden)).astype(np.float32),
        token_ids=[rng.integers(0, 100, len(tokens)) for tokens in token_strings],
        tokens=token_strings,
        next_token_ids=rng.integers(0, 100, (n, k)), next_token_probs=rng.random((n, k)).astype(np.float32),
        next_tokens=[[tokens[0], tokens[-1]] for tokens in token_strings],
        lens_token_ids=rng.integers(0, 100, (n, layers, k)),
        lens_probs=rng.random((n, layers, k)).astype(np.float32),
        lens_tokens=[[[tokens[0], tokens[-1]]] * layers for tokens in token_strings],
    )


@FUZZ
@given(
    st.lists(st.text(characters, min_size=1, max_size=30), min_size=1, max_size=5, unique=True),
    st.lists(st.text(characters, min_size=0, max_size=6), min_size=1, max_size=4),
    st.integers(0, 2**16),
)
def test_store_round_trip(prompt_texts, tokens, seed):
    token_strings = [tokens for _ in prompt_texts]
    trace = fake_trace(prompt_texts, token_strings, seed)
    with tempfile.TemporaryDirectory() as folder:
        store = TraceStore.open(Path(folder), model={"weights_sha256": "w", "dtype": "float32"}, options={"o": 1})
        store.add(trace)
        reopened = TraceStore.open(Path(folder))
        order = list(reversed(prompt_texts))
        loaded = reopened.load(order)
        rows = [prompt_texts.index(t) for t in order]
        assert loaded.prompts == order
        np.testing.assert_array_equal(loaded.states, trace.states[rows])
        np.testing.assert_array_equal(loaded.final_states, trace.final_states[rows])
        np.testing.assert_array_equal(loaded.lens_probs, trace.lens_probs[rows])
        assert loaded.tokens == [token_strings[r] for r in rows]
        assert loaded.lens_tokens == [trace.lens_tokens[r] for r in rows]
        assert [ids.tolist() for ids in loaded.token_ids] == [trace.token_ids[r].tolist() for r in rows]
        assert reopened.missing(prompt_texts) == []
