"""Fixtures for job tests: the shard specs of tests/pipeline; S3, the tiny codec and Ray come from tests/conftest.py."""

from __future__ import annotations

from tests.pipeline.conftest import shard_specs as shard_specs  # the fixture, re-exported for tests/jobs
