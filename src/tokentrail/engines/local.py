"""Local engine: trace what the store lacks, in this process, one shard at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich.console import Console

from tokentrail.store import TraceStore
from tokentrail.terminal import progress_bar

if TYPE_CHECKING:  # the tracer imports torch; a run that traces nothing never needs it
    from tokentrail.tracing import Tracer


@dataclass
class TraceReport:
    traced: int
    reused: int
    shards_written: int
    forward_passes: int
    problems: list[str] = field(default_factory=list)


def trace_into_store(
    store: TraceStore,
    texts: Sequence[str],
    make_tracer: Callable[[], Tracer],
    shard_size: int = 64,
    show_progress: bool = True,
    console: Console | None = None,
) -> TraceReport:
    """Trace the texts the store does not hold yet; the model is only built when something is missing.

    Each shard is committed as soon as it is traced, so an interrupted run loses at most one shard of work.
    """
    missing = store.missing(texts)
    problems = list(store.problems)
    unique = len(set(texts))
    if not missing:
        return TraceReport(traced=0, reused=unique, shards_written=0, forward_passes=0, problems=problems)
    tracer = make_tracer()
    shards = 0
    with progress_bar("tracing", "prompts", console, disable=not show_progress) as progress:
        task = progress.add_task("trace", total=len(missing))
        traced = 0
        for start in range(0, len(missing), shard_size):
            chunk = list(missing[start : start + shard_size])
            # Another writer (a second process on an overlapping prompt set) may have committed some meanwhile.
            store.refresh()
            todo = [text for text, held in zip(chunk, store.holds(chunk)) if not held]
            if todo:
                store.add(tracer.trace(todo))
                shards += 1
                traced += len(todo)
            progress.advance(task, len(chunk))
    return TraceReport(
        traced=traced,
        reused=unique - traced,
        shards_written=shards,
        forward_passes=tracer.n_forward_passes,
        problems=problems,
    )
