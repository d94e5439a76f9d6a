"""jobs/ray_session.start_ray: after ``kill -9`` of the driver no process of its Ray session is left behind.

Without the reaper, ray::DashboardAgent and ray::RuntimeEnvAgent outlive a SIGKILLed driver by 1-2 minutes
(~90 MB each; see the module docstring); with it the whole session is gone within a few seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

DRIVER = """
import os, time
import psutil, ray
from rllib_treerpo.jobs.ray_session import session_pids, start_ray

assert start_ray(num_cpus=1, log_to_driver=False)
assert not start_ray()  # already up: nothing to do

@ray.remote(num_cpus=0)
class Busy:
    def pid(self):
        return os.getpid()

actor = Busy.remote()
ray.get(actor.pid.remote())
pids = set()
for pid in session_pids():
    proc = psutil.Process(pid)
    pids |= {pid} | {child.pid for child in proc.children(recursive=True)}
print("PIDS", *sorted(pids), flush=True)
time.sleep(300)
"""


def alive(pids: list[int]) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_a_sigkilled_driver_leaves_no_ray_process_behind():
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        line = driver.stdout.readline()
        assert line.startswith("PIDS"), line
        pids = [int(p) for p in line.split()[1:]]
        names = {p: open(f"/proc/{p}/cmdline").read().split("\0")[0] for p in pids}
        assert any("DashboardAgent" in n for n in names.values()), names  # the ones that used to linger
        assert any("raylet" in n for n in names.values()), names
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 20
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = alive(pids)
    assert not left, {p: names[p] for p in left}
