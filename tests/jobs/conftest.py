"""Fixtures for job tests: the pipeline fixtures (shards, moto S3, tiny codec) plus a local Ray."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pipeline.conftest import (  # noqa: F401 - re-exported fixtures
    other_model_dir,
    s3_server,
    shard_specs,
    tiny_model_dir,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_address(s3_server) -> Iterator[str]:  # noqa: ANN001, F811 - AWS test env must be set before workers start
    """A real local Ray: 8 logical CPUs on this 2-core machine (fewer deadlock, see ecosystem §1.8)
    and 2 fake GPUs, so the executor takes its GPU-actor path (the codec then runs on CPU)."""
    import ray

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60 turns token auth on by default
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
