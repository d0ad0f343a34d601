"""The archive pipeline: WebDataset shards -> encoder batches -> Parquet archives, resumably.

Knows shards, samples, batches, records and Parquet; nothing of diffusion (the codec arrives as
an ``pipeline.encoder.Encoder``) and nothing of Ray outside ``pipeline/executors/ray.py``.

    shards.py   patterns -> ShardRef          reader.py   tar stream -> Sample (damage recorded)
    images.py   bytes -> RGB or a reason      batching.py images -> bounded batches
    runner.py   process_shard: the unit       writer.py   records -> Parquet (explicit schema)
    manifest.py output layout, run.json, done markers      storage.py  fsspec, atomic writes
    lease.py    one live job per output prefix (_lease.json)  retry.py  --retry-failed: transient rows redone
    failures.py which failures are transient (rows, shard attempts)
    rows.py     the row base (status/reason/error, fail()) and schemas derived from row classes
    engine.py   run_job: the one driver of every shard job (lease, guard file, job.yaml, pending
                shards, executor, summary); archive, restore and audit are its tasks (jobs/commands)
    executors/  local.py, ray.py, errors.py (which shard errors end a run)   progress.py tqdm bars

The decode side (docs/restore-audit.md) runs on the same driver and executors with its own work functions:

    archives.py  archive prefix -> shards, rows, point lookup     decoder.py  Decoder protocol, size buckets
    restore.py   restore_shard: archive -> PNG tar / folder        audit.py    audit_shard + aggregate
    metrics.py   PSNR, MS-SSIM, FID/KID math (networks: perceptual/) report.py   report.html + plots

The format and the resume rules are documented in docs/archive-format.md.
"""
