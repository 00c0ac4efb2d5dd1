"""Coverage suite: every causal-LM type in transformers is traced correctly or refused at load with a reason.

Each type is built tiny (tests/zoo.py), loaded like a user's model and, when tokentrail accepts it, checked
against an independent reference (tests/model_coverage.py). docs/models.md is generated from the same code and must
match what this run finds, so the page cannot drift.
"""

from __future__ import annotations

import pytest

from model_coverage import DOC, Row, classify, normalised, read_doc
from zoo import causal_lm_types

TYPES = causal_lm_types()


@pytest.fixture(scope="module")
def documented() -> dict[str, Row]:
    assert DOC.exists(), "docs/models.md is missing: run `make models-doc`"
    return read_doc()


def test_doc_lists_exactly_the_installed_types(documented):
    import transformers

    assert f"transformers {transformers.__version__}" in DOC.read_text(encoding="utf-8"), (
        "docs/models.md was generated with another transformers version: run `make models-doc`")
    assert sorted(documented) == TYPES


def test_coverage_does_not_fall(documented):
    # 95 % of the types (issue 13): a change that loses a type
    # fails here instead of quietly shrinking the table.
    traced = sum(row.status == "traced" for row in documented.values())
    assert traced >= 187, f"only {traced} of {len(TYPES)} types trace"


@pytest.mark.parametrize("model_type", TYPES)
def test_type_is_traced_correctly_or_refused(model_type, tiny_tokenizer, documented):
    # classify raises WrongNumbers when tokentrail traces the type and any number differs from the reference.
    row = classify(model_type, tiny_tokenizer)
    expected = documented[model_type]
    assert (row.model_class, row.status) == (expected.model_class, expected.status), (
        f"{model_type}: found {row.status} ({row.detail}), docs/models.md says {expected.status}: "
        "run `make models-doc` after checking why")
    assert normalised(row.detail) == normalised(expected.detail)
    if row.status == "refused":
        assert "\n" not in row.detail and row.detail, "a refusal is one line with a reason"
