"""``rdeic count``: a toy shard job (one file, as docs/jobs.md "Add a job" shows): samples and bytes per shard.

It reads each WebDataset shard and writes ``counts/<shard>.json``; everything else (resume from
done markers, retries, the lease, the guard file, job.yaml, --config, the summary, exit statuses)
comes from the one driver. No model: its "model" is a stand-in with a fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jobs.options import JobOptions, option
from jobs.shardjob import JobTask, shard_command
from pipeline import storage
from pipeline.engine import Prepared, Ran
from pipeline.manifest import Manifest, OutputLocation
from pipeline.reader import ShardReader
from pipeline.shards import expand_inputs
from pipeline.types import ShardRef, ShardStats

HELP = "count the samples and bytes of WebDataset shards (a toy job)"


@dataclass(frozen=True, kw_only=True)
class CountJob(JobOptions):
    inputs: tuple[str, ...] = option("shards to count; repeatable", key="input", repeat=True, required=True,
                                     nonempty=True, metavar="PATTERN")
    output: str = option("where counts/<shard>.json go", required=True, metavar="URL")
    min_bytes: int = option("members smaller than this are not counted", default=0, min=0)


@dataclass(frozen=True)
class NoModel:
    """What each worker 'loads': a fingerprint and a device are all the executors ask of a model."""

    fingerprint: bytes = b"count-v1"
    device: str = "cpu"

    def load(self, device: str = "auto") -> NoModel:
        return self


def count_shard(shard: ShardRef, model: NoModel, out: OutputLocation, config: dict[str, Any], *, attempt: int = 1,
                worker: str = "", progress: Any = None) -> ShardStats:
    """The work function: one shard in, one JSON file and the done marker out."""
    reader = ShardReader(shard.url, config["storage_options"])
    samples = sizes = 0
    for sample in reader:
        samples += 1
        sizes += sum(m.size for m in sample.members if m.size >= config["min_bytes"])
    path = out.path("counts", f"{shard.shard_id}.json")
    storage.write_bytes_atomic(out.fs, path, json.dumps({"samples": samples, "bytes": sizes}).encode())
    stats = ShardStats(shard_id=shard.shard_id, url=shard.url, archive=out.to_url(path),
                       codec_fingerprint=model.fingerprint.hex(), rows=samples, ok=samples, src_bytes=sizes,
                       attempt=attempt, worker=worker, device=model.device)
    Manifest(out).mark_done(stats)
    return stats


class CountTask(JobTask):
    kind = "count"
    verb = "counting"
    options: CountJob

    def urls(self) -> list[str]:
        return [*self.options.inputs, self.options.output]

    def prepare(self, storage_options: dict[str, Any]) -> Prepared:
        out = OutputLocation(self.options.output, storage_options)
        settings = {"min_bytes": self.options.min_bytes}
        config = {"storage_options": storage_options, "min_bytes": self.options.min_bytes}
        return Prepared(out, NoModel(), config, count_shard, Manifest(out).settings_guard("count.json", settings, {}),
                        state={"shards": expand_inputs(self.options.inputs, storage_options)})

    def shards(self, prepared: Prepared) -> list[ShardRef]:
        shards: list[ShardRef] = prepared.state["shards"]
        return shards

    def summarize(self, summary: dict[str, Any], ran: Ran) -> None:
        summary["bytes"] = sum(s.src_bytes for s in ran.all_stats)


def format_summary(summary: dict[str, Any]) -> str:
    return (f"counted {summary['images']['total']} samples, {summary['bytes']} bytes in "
            f"{summary['shards']['total']} shards")


OPTIONS = CountJob
add_parser = shard_command(CountJob, CountTask, format_summary, __doc__)
