"""Progress reporting: executors call a sink; the CLI's sink draws tqdm bars.

Executors report per shard (images processed so far, done, failed); the sink turns that into two
live bars: shards (done/total) and images (count, images/s, and an ETA from the mean images per
finished shard, since a shard's size is unknown before it has been read).
"""

from __future__ import annotations

import logging
from typing import Protocol

from tqdm import tqdm

from .types import ShardStats

log = logging.getLogger(__name__)


class ProgressSink(Protocol):
    verb: str  # names the job in the start line: archiving, restoring, auditing (set by the driver)

    def start(self, total_shards: int, already_done: int) -> None: ...

    def shard_progress(self, shard_id: str, images: int, worker: str) -> None: ...

    def shard_done(self, stats: ShardStats) -> None: ...

    def shard_failed(self, shard_id: str, error: str, will_retry: bool) -> None: ...

    def close(self) -> None: ...


class NullProgress:
    """A sink that only logs shard completions and failures.

    ``verb`` names the job in the start line (the driver sets it from the task: ``restoring``...).
    """

    verb = "archiving"

    def start(self, total_shards: int, already_done: int) -> None:
        log.info("%s %d shard(s); %d already done", self.verb, total_shards, already_done)

    def shard_progress(self, shard_id: str, images: int, worker: str) -> None:
        pass

    def shard_done(self, stats: ShardStats) -> None:
        damage = f", DAMAGED: {stats.damage['message']}" if stats.damage else ""
        log.info("shard %s done: %d ok, %d failed in %.1fs (attempt %d, %s)%s", stats.shard_id, stats.ok,
                 stats.failed, stats.seconds.get("total", 0.0), stats.attempt, stats.worker, damage)

    def shard_failed(self, shard_id: str, error: str, will_retry: bool) -> None:
        log.warning("shard %s attempt failed%s: %s", shard_id, " (will retry)" if will_retry else "", error)

    def close(self) -> None:
        pass


class TqdmProgress(NullProgress):
    """Two tqdm bars (shards, images) on stderr; disabled automatically when not on a terminal."""

    def __init__(self, disable: bool | None = None) -> None:
        self.disable = disable
        self._shards: tqdm | None = None
        self._images: tqdm | None = None
        self._total_shards = 0
        self._done_shards = 0
        self._done_images = 0
        self._failed_images = 0
        self._in_flight: dict[str, int] = {}

    def start(self, total_shards: int, already_done: int) -> None:
        super().start(total_shards, already_done)
        self._total_shards = total_shards
        self._shards = tqdm(total=total_shards, desc="shards", unit="shard", position=0, disable=self.disable)
        self._images = tqdm(total=None, desc="images", unit="img", position=1, disable=self.disable)

    def shard_progress(self, shard_id: str, images: int, worker: str) -> None:
        self._in_flight[shard_id] = images
        self._refresh_images()

    def shard_done(self, stats: ShardStats) -> None:
        self._in_flight.pop(stats.shard_id, None)
        self._done_shards += 1
        self._done_images += stats.rows
        self._failed_images += stats.failed
        if self._shards is not None:
            self._shards.update(1)
        self._refresh_images()
        if self._shards is not None and not self._shards.disable:
            self._shards.write(f"shard {stats.shard_id}: {stats.ok} ok, {stats.failed} failed"
                               + (f", damaged ({stats.damage['message']})" if stats.damage else ""))
        else:
            super().shard_done(stats)

    def shard_failed(self, shard_id: str, error: str, will_retry: bool) -> None:
        self._in_flight.pop(shard_id, None)
        self._refresh_images()
        super().shard_failed(shard_id, error, will_retry)

    def _refresh_images(self) -> None:
        bar = self._images
        if bar is None:
            return
        bar.n = self._done_images + sum(self._in_flight.values())
        if self._done_shards:
            per_shard = self._done_images / self._done_shards
            bar.total = max(bar.n, round(per_shard * self._total_shards))
        bar.set_postfix(failed=self._failed_images, refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in (self._images, self._shards):
            if bar is not None:
                bar.close()
