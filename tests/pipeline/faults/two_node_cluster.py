"""A two-node Ray cluster on this machine, in a process of its own:
``python -m tests.pipeline.faults.two_node_cluster [--head-cpus N] [--worker-cpus N]``.

Ray's own test cluster (``ray.cluster_utils.Cluster``): a head node and a worker node, each with
its own raylet, object store and workers, both on loopback. It runs outside the pytest process
because creating a cluster there would repoint that process's Ray globals (internal KV, the
current-cluster address) away from the session's own local Ray. Give it a private ``RAY_TMPDIR``
(a short path: Ray's socket paths must stay under 108 bytes): a head node writes its address to
``$RAY_TMPDIR/ray/ray_current_cluster``, and under the default ``/tmp/ray`` every other
``ray.init()`` on the machine would try to join this cluster while it runs, or after a crash.

Protocol, one JSON object per line on stdout:

* at start: ``{"address": GCS, "head": NODE_ID, "worker": NODE_ID}``;
* ``kill-worker`` on stdin: every process of the worker node is SIGKILLed at once, as if its machine
  had gone: first the worker processes its raylet started (the actors; left alone they would
  keep answering for a moment after their raylet is gone), then the raylet and the node's other
  Ray processes (``Cluster.remove_node(..., allow_graceful=False)``). Then
  ``{"killed": NODE_ID, "processes": N, "at": UNIX_TIME}``;
* ``add-worker`` on stdin: a new worker node joins (the cluster grows back), then ``{"added": NODE_ID}``;
* end of stdin: the cluster is shut down and the process exits.

The head's GCS health checks are tightened (every 0.5 s, dead after 4 misses) so the lost node is
declared dead in about 2 s instead of Ray's default of about 15 s. Nothing else is changed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

HEAD_CPUS = 2  # by default one actor, and room for the lost node's actor to be restarted here
WORKER_CPUS = 1
HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                 "health_check_timeout_ms": 500, "health_check_failure_threshold": 4}


def kill_node(cluster: Any, node: Any) -> int:
    """SIGKILL the node's worker processes, then its Ray processes; returns how many workers were killed."""
    import psutil
    from ray._private import ray_constants

    workers = []
    for info in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, []):
        try:
            workers += psutil.Process(info.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for proc in workers:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    cluster.remove_node(node, allow_graceful=False)
    return len(workers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-cpus", type=int, default=HEAD_CPUS)
    ap.add_argument("--worker-cpus", type=int, default=WORKER_CPUS)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": args.head_cpus, "include_dashboard": False, "_system_config": HEALTH_CHECKS})
    try:
        worker = cluster.add_node(num_cpus=args.worker_cpus)
        cluster.wait_for_nodes()
        print(json.dumps({"address": cluster.address, "head": cluster.head_node.node_id,
                          "worker": worker.node_id}), flush=True)
        for line in sys.stdin:
            if line.strip() == "kill-worker":
                killed = kill_node(cluster, worker)
                print(json.dumps({"killed": worker.node_id, "processes": killed, "at": time.time()}), flush=True)
            elif line.strip() == "add-worker":
                worker = cluster.add_node(num_cpus=args.worker_cpus)
                print(json.dumps({"added": worker.node_id}), flush=True)
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
