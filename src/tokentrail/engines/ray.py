"""Ray engine: trace what the store lacks on Ray actors, one model copy per actor, all writing into one store.

The prompts the store lacks are cut into shards exactly as the local engine cuts them, and each shard goes to
the next idle actor. An actor traces its shard and commits it with `TraceStore.add`, which takes the store's
file lock and rereads the manifest, so actors never overwrite each other's entries and an interrupted run
keeps every committed shard. Because a shard's prompts are batched the same way on any engine, the stored
arrays are the ones the local engine would have written.

Every actor opens the store by path: on a cluster of several machines the store must lie on a filesystem all
of them mount at the same path (NFS, a cluster filesystem); an actor that cannot see it says so and stops. A
local model path is made absolute before it is shipped, since actors run in another working directory.
Actors are spread over the cluster's nodes (Ray's SPREAD strategy) rather than packed onto the first.

An actor that dies (killed, out of memory, its node lost) costs no rerun: the driver checks whether its shard
was committed before it died, queues it again if not, and starts a replacement actor; only a shard whose
actors die more than `retries` times stops the run, with the committed shards kept for a rerun to resume.
See docs/ray.md. Ray is optional: `pip install 'tokentrail[ray]'`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from tokentrail.core.trace import TraceOptions
from tokentrail.engines.local import TraceReport
from tokentrail.errors import TokentrailError, first_line
from tokentrail.models.sources import EMBEDDED
from tokentrail.store import TraceStore
from tokentrail.terminal import progress_bar

if TYPE_CHECKING:  # importing tokentrail.runs at run time would make runs -> engines -> runs a cycle
    from tokentrail.models.settings import ModelSettings

INSTALL_HINT = "install the ray extra: pip install 'tokentrail[ray]'"


def require_ray():
    """The `ray` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise TokentrailError(f"--engine ray needs Ray, which is not installed; {INSTALL_HINT}") from None
    return ray


class ShardWorker:
    """One model copy on one Ray worker; traces whole shards and commits each into the shared store.

    The model is loaded by the first call rather than in the constructor: an error raised by a method comes
    back to the driver as that exception, one raised by a constructor only as the text of a dead actor.
    """

    def __init__(self, store_root: str, model_settings: ModelSettings, options: TraceOptions,
                 batch_size: int | None, threads: int | None) -> None:
        self.store_root = Path(store_root)
        self.model_settings = model_settings
        self.options = options
        self.batch_size = batch_size
        self.threads = threads
        self.store: TraceStore | None = None
        self.tracer: Any = None

    def _setup(self) -> None:
        import torch

        from tokentrail.tracing import Tracer

        if self.threads:
            torch.set_num_threads(self.threads)
        if not TraceStore.exists(self.store_root):
            import socket

            raise TokentrailError(
                f"a Ray worker on {socket.gethostname()} cannot see the store {self.store_root}; on a cluster "
                "the run directory must be on a filesystem every node mounts at the same path"
            )
        self.store = TraceStore.open(self.store_root)
        self.tracer = Tracer(self.model_settings.load(), self.options, batch_size=self.batch_size)

    def trace_shard(self, texts: list[str]) -> tuple[int, int]:
        """Trace and commit one shard; returns (prompts traced, forward passes run)."""
        if self.tracer is None:
            self._setup()
        before = self.tracer.n_forward_passes
        self.store.add(self.tracer.trace(texts))
        return len(texts), self.tracer.n_forward_passes - before


def _worker_resources(ray, model_settings: ModelSettings, n_workers: int, cpus_per_worker: float | None,
                      gpus_per_worker: float | None) -> tuple[float, float]:
    """CPUs and GPUs each actor asks Ray for: a GPU each when the model is meant for one and the cluster has
    them, else an equal share of the cluster's CPUs so that actors do not oversubscribe the cores.

    An actor runs on one node, so the share is the largest that lets all `n_workers` actors fit on the nodes as
    they are: the cluster's total divided by the workers could exceed every node (2 nodes of 8 CPUs, 1 worker:
    16) and leave the actor waiting forever for a node that does not exist.
    """
    resources = ray.cluster_resources()
    if gpus_per_worker is None:
        wants_gpu = model_settings.device in ("cuda", "auto") or bool(model_settings.device_map)
        gpus_per_worker = 1.0 if wants_gpu and resources.get("GPU", 0) >= 1 else 0.0
    if cpus_per_worker is None:
        node_cpus = [int(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
        share = int(resources.get("CPU", 1) // max(1, n_workers))
        while share > 1 and sum(cpus // share for cpus in node_cpus) < n_workers:
            share -= 1
        cpus_per_worker = 1.0 if gpus_per_worker else float(max(1, share))
    return float(cpus_per_worker), float(gpus_per_worker)


def _portable(model_settings: ModelSettings) -> ModelSettings:
    """The settings with a local model path made absolute, as every actor must be given it.

    Actors run in another working directory (and on a cluster on other machines), where a relative path would
    name nothing or another model. The symlinks in the path are kept: on a shared filesystem it is the path
    every node mounts that is the same, not necessarily what it points to. A hub id or embedded model name
    that is not a local path is left as it is, as `resolve_source` would read it.
    """
    spec = model_settings.spec.strip()
    if spec in ("default", *EMBEDDED):
        return model_settings
    path = Path(spec).expanduser()
    if (path.is_absolute() and not spec.startswith("~")) or not path.exists():
        return model_settings
    return dataclasses.replace(model_settings, spec=os.path.abspath(path))


def _unwrap(ray, exc: BaseException) -> TokentrailError:
    """A failed actor's error as one line: the worker's own TokentrailError when it raised one."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, TokentrailError):
        return cause
    if isinstance(exc, ray.exceptions.RayActorError) and getattr(exc, "actor_init_failed", False):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return TokentrailError(f"a Ray worker could not start: {lines[-1] if lines else 'no detail'}")
    if isinstance(exc, ray.exceptions.RayActorError):
        return TokentrailError(
            "a Ray worker died (out of memory, or its node was lost); the shards already traced are stored: "
            "rerun the same command to resume"
        )
    detail = cause if cause is not None else exc
    return TokentrailError(f"a Ray worker failed: {type(detail).__name__}: {first_line(detail)}; rerun to resume")


def trace_into_store_ray(
    store: TraceStore,
    texts: Sequence[str],
    model_settings: ModelSettings,
    options: TraceOptions,
    batch_size: int | None,
    shard_size: int,
    n_workers: int = 2,
    address: str | None = None,
    show_progress: bool = True,
    console: Console | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    retries: int = 2,
) -> TraceReport:
    """Trace the texts the store does not hold yet on `n_workers` Ray actors; same result as the local engine.

    `address` joins a running cluster ("auto", "ray://host:10001", "host:6379"); without it the Ray instance
    this process already started is used, or a local one is started for this call and stopped after it.
    No actor, and no model, is started when nothing is missing. A shard whose actor dies is traced again on a
    replacement actor, up to `retries` times; then the run stops and a rerun resumes it.
    """
    if n_workers < 1:
        raise TokentrailError(f"--workers must be at least 1, got {n_workers}")
    if shard_size < 1:
        raise TokentrailError(f"--shard-size must be at least 1, got {shard_size}")
    ray = require_ray()
    missing = store.missing(texts)
    problems = list(store.problems)
    unique = len(set(texts))
    if not missing:
        return TraceReport(traced=0, reused=unique, shards_written=0, forward_passes=0, problems=problems)
    chunks = [list(missing[start : start + shard_size]) for start in range(0, len(missing), shard_size)]
    queue = collections.deque(range(len(chunks)))  # indices of the shards no actor has yet
    deaths: collections.Counter[int] = collections.Counter()  # actor deaths while tracing each shard
    n_workers = min(n_workers, len(chunks))
    started_here = not ray.is_initialized()
    if started_here:
        try:
            # Worker output (weight-loading bars of every actor) would drown the progress bar; worker
            # errors still come back as exceptions.
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except ConnectionError as exc:
            raise TokentrailError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None
    actors: list[Any] = []
    traced = shards = passes = 0
    try:
        cpus, gpus = _worker_resources(ray, model_settings, n_workers, cpus_per_worker, gpus_per_worker)
        # SPREAD: on a cluster, one actor per node before two on any, so that N workers use N machines' memory
        # bandwidth and a lost node costs as few actors as possible.
        remote = ray.remote(ShardWorker).options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy="SPREAD")
        root = str(Path(store.root).resolve())
        threads = int(cpus) if cpus >= 1 and not gpus else None
        shipped = _portable(model_settings)

        def start_actor() -> Any:
            actor = remote.remote(root, shipped, options, batch_size, threads)
            actors.append(actor)
            return actor

        pending: dict[Any, tuple[Any, int]] = {}

        def give_work(actor: Any) -> None:
            if queue:
                index = queue.popleft()
                pending[actor.trace_shard.remote(chunks[index])] = (actor, index)
            else:
                # Nothing left for it: free its CPUs (or GPU) now, for a replacement actor that may be waiting
                # for them, and for the cluster's other jobs.
                ray.kill(actor)

        with progress_bar("tracing", "prompts", console, disable=not show_progress) as progress:
            task = progress.add_task("trace", total=len(missing))
            for _ in range(n_workers):
                give_work(start_actor())
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                actor, index = pending.pop(done[0])
                try:
                    count, forward_passes = ray.get(done[0])
                except ray.exceptions.RayActorError as exc:
                    if getattr(exc, "actor_init_failed", False):
                        raise _unwrap(ray, exc) from None
                    ray.kill(actor)  # an unreachable actor may still be alive: it must not commit this shard too
                    # The actor may have died after committing the shard (the commit is atomic: a shard is
                    # wholly stored or not at all); tracing it again would then store its prompts twice. The
                    # forward passes of such a shard are not known, and not counted.
                    lost = TraceStore.open(store.root).missing(chunks[index])
                    if not lost:
                        traced += len(chunks[index])
                        shards += 1
                        progress.advance(task, len(chunks[index]))
                    elif deaths[index] >= retries:
                        raise _unwrap(ray, exc) from None
                    else:
                        deaths[index] += 1
                        if len(lost) < len(chunks[index]):
                            chunks[index] = lost
                        queue.appendleft(index)
                    if queue:
                        give_work(start_actor())
                    continue
                except (ray.exceptions.RayError, TokentrailError) as exc:
                    raise _unwrap(ray, exc) from None
                traced += count
                passes += forward_passes
                shards += 1
                progress.advance(task, count)
                give_work(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()
        # The actors committed through their own handles on the store; the caller's must see their shards.
        _reread(store)
    return TraceReport(traced=traced, reused=unique - len(missing), shards_written=shards,
                       forward_passes=passes, problems=problems)


def _reread(store: TraceStore) -> None:
    """Make `store` see the shards other processes committed since it was opened."""
    refresh = getattr(store, "refresh", None)
    if callable(refresh):
        refresh()
    else:  # a store without refresh(): take over the state of a handle opened now
        vars(store).update(vars(TraceStore.open(store.root)))
