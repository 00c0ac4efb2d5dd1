"""How a run batches and where it traces: choices that must not change what is recorded."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchSettings:
    batch_size: int | None = 16  # None: sized automatically by padding and the memory budget
    shard_size: int = 64
    padding_side: str | None = None  # None: what the model's load-time self-check proved exact


@dataclass(frozen=True)
class EngineSettings:
    """Where tracing runs: this process, or Ray actors (one model copy each) writing into the same store."""

    engine: str = "local"
    workers: int = 2
    ray_address: str | None = None
