"""Steering: push a prompt's residual stream along a direction at chosen layers and measure what it does.

One concept per module:

- `vectors`: where a direction comes from (category means, PCA, a file) and its scale;
- `hooks`: `Steering`, the context that adds the vector to a block's output;
- `generation`: greedy generation with a KV cache, optionally steered, capturing the last prompt token's states;
- `statistics`: Wilson intervals and the exact McNemar test;
- `results`: the per-condition record, the results table and the files written;
- `experiment`: `run_steering`, the seed's follow-up experiment.
"""

from tokentrail.steering.experiment import (
    DEFAULT_ALPHAS,
    DEFAULT_PRESET,
    DEFAULT_SOURCE,
    DEFAULT_TARGET,
    default_layers,
    prepare_run,
    run_steering,
)
from tokentrail.steering.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    Generated,
    batch_order,
    encode_prompts,
    ends_line,
    generate,
)
from tokentrail.steering.hooks import POSITIONS, Steering
from tokentrail.steering.results import Condition, SteeringResult
from tokentrail.steering.statistics import mcnemar_p, wilson_interval
from tokentrail.steering.vectors import (
    METHODS,
    SteeringVector,
    axis_score,
    centroids,
    random_vector,
    residual_scale,
    steering_vector,
)

__all__ = [
    "DEFAULT_ALPHAS", "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_PRESET", "DEFAULT_SOURCE", "DEFAULT_TARGET", "METHODS",
    "POSITIONS", "Condition", "Generated", "Steering", "SteeringResult", "SteeringVector", "axis_score",
    "batch_order", "centroids", "default_layers", "encode_prompts", "ends_line", "generate", "mcnemar_p",
    "prepare_run", "random_vector", "residual_scale", "run_steering", "steering_vector", "wilson_interval",
]
