"""Fixtures for the fault tests: a flaky proxy in front of the session's moto server, and shards
of real photos stored straight into moto (setup never goes through the proxy).

moto, the tiny codec and the local Ray come from ``tests/conftest.py``; shard builders from
``tests/pipeline/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.pipeline.faults.flaky_proxy import FlakyS3Proxy


@pytest.fixture
def flaky_s3(s3_server) -> Iterator[Callable[..., FlakyS3Proxy]]:
    """Start a :class:`FlakyS3Proxy` in front of moto: ``flaky_s3(rate=0.05, seed=0, ...)``; stopped after the test."""
    proxies: list[FlakyS3Proxy] = []

    def start(**kwargs: Any) -> FlakyS3Proxy:
        proxy = FlakyS3Proxy(s3_server.endpoint, **kwargs).start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our own read retries pause 10 ms instead of 0.2 s (doubling): tests that exhaust them stay quick."""
    from pipeline import storage

    monkeypatch.setattr(storage, "READ_BACKOFF_S", 0.01)
