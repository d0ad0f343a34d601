"""`make demo` and its scaffolding, kept out of the command package `jobs/`.

Not installed: like `tools/` and `bench/` it runs from the repo root (`python -m demo`, or
`make demo`); pytest finds it through `pythonpath = ["."]`.

* `demo/run.py` — the demo itself: real photos -> shards on an embedded S3 -> archive, restore and
  audit jobs on Ray -> JPEG/WebP at the nearest rate.
* `demo/report.py` — turns those outputs into `outputs/demo/report/report.html`.
* `demo/local_s3.py` — the embedded S3 endpoint (moto on loopback) the demo, the tests and the
  benchmarks use; no job of `jobs/` needs it.
"""
