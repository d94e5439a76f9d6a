"""Start Ray for a job so that nothing of its session outlives the job, even after ``kill -9`` of the driver.

Why. ``ray.init()`` starts the GCS, the raylet, the dashboard head, the monitors (children of the driver: they
notice its death and exit within seconds) and, under the raylet, the dashboard agent and the runtime-env
agent. When the driver is SIGKILLed the raylet dies, the agents notice within ~6 s (they watch the raylet),
then try to publish "the raylet died unexpectedly" to the GCS, which is already gone, with a 60 s RPC timeout
(ray's ``_private/process_watcher.py``): each lingers a minute or two holding memory, while everything else is
gone within seconds. A Ctrl-C'd or crashing driver that runs ``ray.shutdown()`` (atexit) does not leave them:
the raylet then logs SIGTERM and the agents skip the publish.

What :func:`start_ray` adds: a reaper, a small helper process in its own session (a terminal's Ctrl-C does not
reach it) that holds the read end of a pipe whose write end only the driver holds. While the driver lives the
reaper records the session's processes (the ones ``ray.init`` started plus every descendant of the raylet,
with their start times, so a reused pid is never touched). At EOF (the driver exited, however it exited) it
gives them ``GRACE_S`` seconds to exit on their own, then SIGKILLs what is left, and exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

GRACE_S = 2.0  # after the driver's death, before leftovers are killed
REFRESH_S = 1.0  # how often the reaper re-reads the raylet's descendants while the driver lives

_REAPER = r"""
import os, select, signal, sys, time
import psutil

grace, refresh, roots = float(sys.argv[1]), float(sys.argv[2]), [int(p) for p in sys.argv[3:]]
known = {}  # pid -> create_time

def snapshot():
    for pid in roots:
        try:
            proc = psutil.Process(pid)
            for p in [proc] + proc.children(recursive=True):
                known.setdefault(p.pid, p.create_time())
        except psutil.Error:
            pass

def alive():
    out = []
    for pid, created in known.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out

snapshot()
poller = select.poll()
poller.register(0, select.POLLIN | select.POLLHUP)
while True:
    if poller.poll(int(refresh * 1000)):
        if not os.read(0, 1024):
            break  # EOF: the driver is gone
    snapshot()
deadline = time.monotonic() + grace
while alive() and time.monotonic() < deadline:
    time.sleep(0.1)
for p in alive():
    try:
        p.kill()
    except psutil.Error:
        pass
"""

_reaper: subprocess.Popen | None = None


def start_ray(**init_kwargs: Any) -> bool:
    """``ray.init`` with the job defaults (no dashboard, ERROR logging, at least 2 CPUs; ``init_kwargs``
    override them) plus a reaper of the session's processes for when the driver dies without
    ``ray.shutdown()``. Returns False (and does nothing) when Ray is already initialised in this process.

    A running cluster that ``ray.init()`` finds (``RAY_ADDRESS``, or `ray start` on this node) is joined as it
    is: its nodes bring their own CPUs and GPUs (docs/cluster.md)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "logging_level": "ERROR"}
    if existing_cluster(init_kwargs.get("address")) is None:
        kwargs["num_cpus"] = max(2, os.cpu_count() or 2)
    kwargs.update(init_kwargs)
    ray.init(**kwargs)
    start_reaper(session_pids())
    return True


def existing_cluster(address: str | None = None) -> str | None:
    """The address of the running cluster ``ray.init(address)`` would join, None when it would start one."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError):
        return None


def session_pids() -> list[int]:
    """The pids of the processes this driver's ``ray.init`` started (GCS, raylet, dashboard, monitors)."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    if node is None:  # connected to an existing cluster: its processes are not this job's to reap
        return []
    return [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]


def start_reaper(pids: list[int]) -> subprocess.Popen | None:
    """Start the reaper for ``pids`` and their descendants (see the module docstring); None without pids."""
    global _reaper
    if _reaper is not None and _reaper.stdin is not None:
        _reaper.stdin.close()  # a previous session's reaper: it cleans up what that session left, then exits
        _reaper = None
    if not pids:
        return None
    _reaper = subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(GRACE_S), str(REFRESH_S), *map(str, pids)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=True,  # Ctrl-C in a terminal goes to the driver's process group, not here
    )
    return _reaper
