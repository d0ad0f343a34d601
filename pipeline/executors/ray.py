"""Run shards on long-lived Ray actors: one per GPU (model loaded once), CPU actors without GPUs.

This is the only module that imports Ray, and only inside functions, so the rest of the package
(and every unit test) works without it.

Design (shared/design/ecosystem.md §1.6): plain actors, not Ray Data. Each actor keeps the model
resident and runs the plan's work function for one shard at a time, so at most ``num_actors`` shards are
in flight. The driver hands out shards and owns the retry policy:

* an actor that dies (killed, OOM, node lost) is restarted by Ray (``max_restarts``) on any node
  with room for it, and its shard goes back to the queue; the dead attempt wrote nothing that
  counts (marker written last). Actors are spread over the nodes (``SPREAD``), so losing a node
  takes out only its share of them. A restart that cannot happen (no node has room) is waited for
  at most ``restart_timeout_s``; then the actor is given up, and when no actor is left the
  remaining shards get ``_manifest/failed/`` markers instead of the driver waiting forever;
* a shard whose attempt raised is retried up to ``max_shard_retries`` times unless the error is
  not retryable (missing input); then it is recorded under ``_manifest/failed/``;
* a worker that cannot start (bad model path, fingerprint of another model) fails the run at
  start-up, before any shard is handed out.

Progress: workers post ``(shard, images so far)`` to a tiny ``ProgressBoard`` actor on the
driver's node; the driver takes the updates posted since its last look, at most every
``PROGRESS_INTERVAL_S``. Nothing on the board or in the loop grows with the number of finished
shards, so the driver's cost per shard stays flat (docs/benchmarks.md, "Driver at 20,000 shards").
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..manifest import OutputLocation
from ..progress import ProgressSink
from ..types import ShardRef, ShardStats
from .base import ExecutorStartError, ModelFactory, RetryBook, RunResult, ShardPlan, ShardWork, describe
from .errors import FatalShardError, is_retryable

if TYPE_CHECKING:  # pragma: no cover
    from ray.actor import ActorHandle

log = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 0.5


class ProgressBoard:
    """Actor holding the progress posted since the driver last took it (latest per shard)."""

    def __init__(self) -> None:
        self._board: dict[str, tuple[int, int, str]] = {}

    def report(self, shard_id: str, attempt: int, images: int, worker: str) -> None:
        self._board[shard_id] = (attempt, images, worker)

    def take(self) -> dict[str, tuple[int, int, str]]:
        """The updates since the last call; the board is empty afterwards, so it never outgrows the
        shards in flight (a snapshot of every shard ever reported made each poll cost O(shards done))."""
        board, self._board = self._board, {}
        return board


class ShardWorker:
    """Actor: loads the model once (``factory.load``), then runs ``work`` on one shard per ``process`` call.

    ``work`` is the plan's per-shard function: the archive's ``process_shard`` with an encoder, or
    restore/audit functions with a decoder; the model only needs ``fingerprint`` and ``device``.
    """

    def __init__(self, factory: ModelFactory, output: OutputLocation, config: Any, device: str,
                 board_name: str, name: str, work: ShardWork) -> None:
        # The board is passed by name: an actor handle among the constructor arguments would live in
        # the object store and can break restarts (ray-project/ray#53727).
        self.name, self.output, self.config, self.board_name, self.work = name, output, config, board_name, work
        self._board: ActorHandle | None = None
        self.encoder = factory.load(device)

    def _report(self, shard_id: str, attempt: int, images: int) -> None:
        import ray

        try:
            if self._board is None:
                self._board = ray.get_actor(self.board_name)
            self._board.report.remote(shard_id, attempt, images, self.name)
        except Exception as exc:  # noqa: BLE001 - progress is best effort; never fail a shard for it
            log.debug("progress report for %s failed: %s", shard_id, exc)

    def ready(self) -> dict[str, Any]:
        import ray

        return {"name": self.name, "device": self.encoder.device, "fingerprint": self.encoder.fingerprint.hex(),
                "pid": os.getpid(), "host": socket.gethostname(), "gpu_ids": list(ray.get_gpu_ids()),
                "node": ray.get_runtime_context().get_node_id()}

    def process(self, shard: ShardRef, attempt: int) -> dict[str, Any]:
        last = 0.0

        def progress(images: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL_S:
                last = now
                self._report(shard.shard_id, attempt, images)

        stats = self.work(shard, self.encoder, self.output, self.config, attempt=attempt,
                          worker=self.name, progress=progress)
        return stats.to_dict()


@dataclass
class _Slot:
    name: str
    handle: Any
    deaths: int = 0
    node: str = ""


@dataclass
class RayExecutor:
    """Args:
        num_actors: workers to start; default one per GPU, or ``CPUs // cpu_actor_cpus`` without GPUs
            (never more than there are shards).
        address: Ray cluster address (``auto``, ``ray://...``); None connects to ``RAY_ADDRESS`` or
            starts a local Ray. An already initialised Ray (tests) is used as it is.
        use_gpus: force GPU (True) or CPU (False) actors; None = GPU actors iff the cluster has GPUs.
        cpus_per_actor: CPUs reserved per GPU actor (its reader thread decodes while the model runs).
        cpu_actor_cpus: CPUs reserved per CPU-only actor (capped at the cluster's CPUs). The codec's
            network passes run on one intra-op thread in its default reproducible mode
            (rdeic_core/numerics.py), so a CPU node is used by one actor per core; every actor holds
            a copy of the model, so raise this for large models on small-memory nodes.
        max_actor_restarts: restarts Ray grants each actor before it is given up.
        restart_timeout_s: how long to wait for a dead actor to come back (Ray restarts it on any
            node with a free slot; after a lost node, possibly only once the cluster has grown back).
            An actor not back by then is given up; with no actor left, the shards still pending are
            recorded as failed (exit status 1, and a rerun does them).
        spread: place the actors with Ray's ``SPREAD`` strategy (over all nodes, so a lost node
            takes out only its share) instead of Ray's default packing.
        device: passed to the encoder factory (``auto``: CUDA when the actor sees a GPU).
        start_timeout_s: how long to wait for all actors to load the model.
        init_kwargs: extra ``ray.init`` arguments when this executor starts Ray itself.
    """

    num_actors: int | None = None
    address: str | None = None
    use_gpus: bool | None = None
    cpus_per_actor: float = 1.0
    cpu_actor_cpus: float = 1.0
    max_actor_restarts: int = 3
    restart_timeout_s: float = 600.0
    spread: bool = True
    device: str = "auto"
    start_timeout_s: float = 900.0
    init_kwargs: dict[str, Any] = field(default_factory=dict)

    def run(self, plan: ShardPlan, progress: ProgressSink) -> RunResult:
        import ray

        if not plan.shards:
            return RunResult()
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address, **self.init_kwargs)
        try:
            return self._run(ray, plan, progress)
        finally:
            if started_here:
                ray.shutdown()

    # ------------------------------------------------------------------ set-up
    def _actor_shape(self, ray: Any, use_gpus: bool, n_shards: int) -> tuple[int, float]:
        """(number of actors, CPUs reserved by each)."""
        resources = ray.cluster_resources()
        cpus = self.cpus_per_actor if use_gpus else min(self.cpu_actor_cpus, max(resources.get("CPU", 1.0), 1.0))
        if self.num_actors is not None:
            if self.num_actors < 1:
                raise ValueError(f"num_actors must be >= 1, got {self.num_actors}")
            n = self.num_actors
        elif use_gpus:
            n = int(resources.get("GPU", 0))
        else:
            n = int(resources.get("CPU", 1.0) // cpus)
        return max(1, min(n, n_shards)), cpus

    def _start_actors(self, ray: Any, plan: ShardPlan, token: str, board_name: str) -> list[_Slot]:
        use_gpus = self.use_gpus if self.use_gpus is not None else ray.cluster_resources().get("GPU", 0) >= 1
        n, cpus = self._actor_shape(ray, use_gpus, len(plan.shards))
        worker_cls = ray.remote(ShardWorker)
        options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": 1 if use_gpus else 0,
                   "max_restarts": self.max_actor_restarts, "max_task_retries": 0}
        if self.spread:
            options["scheduling_strategy"] = "SPREAD"
        slots = []
        for i in range(n):
            name = f"rdeic-{plan.kind}-{token}-{i}"
            handle = worker_cls.options(name=name, **options).remote(
                plan.factory, plan.output, plan.config, self.device, board_name, name, plan.work)
            slots.append(_Slot(name, handle))
        log.info("starting %d %s actor(s)", n, "GPU" if use_gpus else "CPU")
        try:
            self._check_ready(ray, plan, slots, use_gpus)
        except BaseException:
            for slot in slots:
                ray.kill(slot.handle, no_restart=True)
            raise
        return slots

    def _check_ready(self, ray: Any, plan: ShardPlan, slots: list[_Slot], use_gpus: bool) -> None:
        """Wait until every actor has loaded the model, and check it is the run's model."""
        try:
            infos = ray.get([s.handle.ready.remote() for s in slots], timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ExecutorStartError(
                f"{len(slots)} worker actor(s) did not start within {self.start_timeout_s:.0f}s; does the cluster "
                f"have {len(slots)} free {'GPU' if use_gpus else 'CPU'} slot(s)? (set --num-actors)"
            ) from None
        except ray.exceptions.RayError as exc:
            raise ExecutorStartError(f"a worker actor failed to start: {exc}") from None
        for slot, info in zip(slots, infos):
            if plan.config.expected_fingerprint and info["fingerprint"] != plan.config.expected_fingerprint:
                raise FatalShardError(
                    f"worker {info['name']} on {info['host']} loaded codec {info['fingerprint']}, but the run "
                    f"expects {plan.config.expected_fingerprint}; is the model the same on every node?")
            slot.node = info.get("node", "")
            log.info("worker %s ready on %s (node %s, pid %s, device %s, gpus %s)",
                     info["name"], info["host"], slot.node, info["pid"], info["device"], info["gpu_ids"],
                     extra={"event": "worker_ready", "worker": info["name"], "node": slot.node})

    # ------------------------------------------------------------------ driver loop
    def _run(self, ray: Any, plan: ShardPlan, progress: ProgressSink) -> RunResult:
        result = RunResult()
        book = RetryBook(plan, progress, result)
        token = uuid.uuid4().hex[:8]
        board_name = f"rdeic-{plan.kind}-{token}-progress"
        board = self._start_board(ray, board_name)
        pending: deque[ShardRef] = deque(plan.shards)
        in_flight: dict[Any, tuple[ShardRef, _Slot, int]] = {}
        recovering: dict[Any, tuple[_Slot, float]] = {}  # readiness probes of restarting actors, with deadlines
        slots: list[_Slot] = []
        try:
            slots = self._start_actors(ray, plan, token, board_name)
            idle: deque[_Slot] = deque(slots)
            next_poll = time.monotonic() + PROGRESS_INTERVAL_S
            while pending or in_flight:
                while idle and pending:
                    shard, slot = pending.popleft(), idle.popleft()
                    attempt = book.next_attempt(shard)
                    in_flight[slot.handle.process.remote(shard, attempt)] = (shard, slot, attempt)
                if not in_flight and not recovering:
                    break  # no live actor left
                ready, _ = ray.wait([*in_flight, *recovering], num_returns=1, timeout=PROGRESS_INTERVAL_S)
                for ref in ready:
                    if ref in recovering:
                        self._recovered(ray, ref, recovering.pop(ref)[0], idle)
                        continue
                    shard, slot, attempt = in_flight.pop(ref)
                    if self._collect(ray, ref, shard, slot, book, pending):
                        idle.append(slot)
                    elif slot.deaths <= self.max_actor_restarts:
                        # Calls to a restarting actor fail at once; a probe that Ray retries
                        # through the restart tells when it can take a shard again.
                        probe = slot.handle.ready.options(max_task_retries=-1).remote()
                        recovering[probe] = (slot, time.monotonic() + self.restart_timeout_s)
                    else:
                        log.warning("worker %s died %d times; not using it any more", slot.name, slot.deaths)
                now = time.monotonic()
                if recovering:
                    self._give_up_late_restarts(ray, recovering, now)
                if now >= next_poll:  # not per result: a poll is a round trip to the board
                    self._poll_progress(ray, board, in_flight, progress)
                    next_poll = now + PROGRESS_INTERVAL_S
        finally:
            for slot in slots:
                ray.kill(slot.handle, no_restart=True)
            ray.kill(board, no_restart=True)
        for shard in pending:
            book.give_up(shard, "no worker actor left (restarts exhausted, or not restarted within "
                                f"{self.restart_timeout_s:.0f}s)")
        return result

    @staticmethod
    def _start_board(ray: Any, board_name: str) -> Any:
        """The progress board, on the driver's own node (soft): a board on a node that is lost
        would stall every poll until Ray declares the node dead."""
        options: dict[str, Any] = {"num_cpus": 0, "name": board_name}
        try:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                node_id=ray.get_runtime_context().get_node_id(), soft=True)
        except Exception as exc:  # noqa: BLE001 - Ray Client drivers have no node of their own
            log.debug("progress board not pinned to the driver's node: %s", exc)
        return ray.remote(ProgressBoard).options(**options).remote()

    @staticmethod
    def _recovered(ray: Any, ref: Any, slot: _Slot, idle: deque[_Slot]) -> None:
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as exc:
            log.warning("worker %s did not come back: %s", slot.name, str(exc).splitlines()[0] if str(exc) else exc)
            return
        was, slot.node = slot.node, info.get("node", "")
        log.info("worker %s is back after a restart, on node %s (was on %s)", slot.name, slot.node, was,
                 extra={"event": "worker_back", "worker": slot.name, "node": slot.node, "was_on": was})
        idle.append(slot)

    def _give_up_late_restarts(self, ray: Any, recovering: dict[Any, tuple[_Slot, float]], now: float) -> None:
        """Stop waiting for actors whose restart is overdue (no node has room for them)."""
        for ref, (slot, deadline) in list(recovering.items()):
            if now < deadline:
                continue
            del recovering[ref]
            log.warning("worker %s was not restarted within %.0fs (does any live node have room for it?); "
                        "not using it any more", slot.name, self.restart_timeout_s,
                        extra={"event": "worker_given_up", "worker": slot.name})
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - best effort: it may be gone already
                log.debug("killing %s failed: %s", slot.name, exc)

    def _collect(self, ray: Any, ref: Any, shard: ShardRef, slot: _Slot, book: RetryBook,
                 pending: deque[ShardRef]) -> bool:
        """Handle a finished ``process`` call; False when the actor died doing it."""
        try:
            stats = ShardStats.from_dict(ray.get(ref))
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            if isinstance(cause, FatalShardError):
                raise cause from None
            if book.failed(shard, describe(cause), is_retryable(cause)):
                pending.append(shard)
            return True
        except ray.exceptions.RayError as exc:  # the actor died (killed, OOM, node lost) or is restarting
            slot.deaths += 1
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            if book.failed(shard, f"worker {slot.name} died: {type(exc).__name__}: {first_line}", retryable=True):
                pending.append(shard)
            return False
        book.succeeded(stats)
        return True

    @staticmethod
    def _poll_progress(ray: Any, board: Any, in_flight: dict[Any, tuple[ShardRef, _Slot, int]],
                       progress: ProgressSink) -> None:
        try:
            updates = ray.get(board.take.remote(), timeout=10)
        except ray.exceptions.RayError:
            return  # progress is best effort
        if not updates:
            return
        running = {shard.shard_id: attempt for shard, _, attempt in in_flight.values()}
        for shard_id, (attempt, images, worker) in updates.items():
            if running.get(shard_id) == attempt:
                progress.shard_progress(shard_id, images, worker)
