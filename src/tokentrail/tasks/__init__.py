"""Evaluation tasks generated locally and reproducibly, for experiments that need a right answer."""

from tokentrail.tasks.arithmetic import (
    DEFAULT_N_PROBLEMS,
    INSTRUCTION_FORMAT,
    MATH_FORMAT,
    TEMPLATES,
    WORD_FORMAT,
    Problem,
    evaluate,
    extract_answer,
    generate_problems,
    is_correct,
)

__all__ = [
    "DEFAULT_N_PROBLEMS",
    "INSTRUCTION_FORMAT",
    "MATH_FORMAT",
    "TEMPLATES",
    "WORD_FORMAT",
    "Problem",
    "evaluate",
    "extract_answer",
    "generate_problems",
    "is_correct",
]
