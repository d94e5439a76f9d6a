"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): the cluster tests and the cluster soak.

The head node holds the driver (and its local learner); worker nodes offer the custom resource
``runner_node`` that ``custom_resources_per_env_runner: {runner_node: 1}`` asks for, so the env runners run
there. Logical CPUs may exceed the machine's cores. Bytes that reach a node's object store are read from the
raylet's counters (``cumulative_created_bytes``: an object put on the node or pulled to it), which is how a
weight sync is seen to cost one transfer per node. :class:`HiddenNode` starts a node that cannot see a folder
(a private mount namespace with a tmpfs over it: ``unshare -Urm``, where unprivileged user namespaces are
allowed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20
OBJECT_STORE = 200 * MIB  # per node: a few copies of the largest model the benchmark syncs
# Node death noticed in about 3 s instead of 15 s (Ray's defaults: 3 s x 5 missed health checks).
HEAD_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


@contextlib.contextmanager
def local_cluster(runner_nodes: int = 2, runner_cpus: float = 1, log_to_driver: bool = False, **resources):
    """:func:`start_cluster`, connected, in a Ray temp folder of its own; yields (cluster, worker nodes).

    Why a folder of its own: ray.cluster_utils.Cluster (like `ray start`) writes its address to
    ``<RAY_TMPDIR or /tmp>/ray/ray_current_cluster``, where every plain ``ray.init()`` on the machine looks
    first: other jobs of the machine would join this cluster (and fail: "When connecting to an existing
    cluster, num_cpus ... must not be provided"), and after a kill -9 they would try a dead address. Worker
    processes and `ray start` (:class:`HiddenNode`) inherit RAY_TMPDIR."""
    import ray

    import benchmarks.cluster_lib

    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")  # short: socket paths < 108
    cluster = None
    try:
        cluster, nodes = start_cluster(runner_nodes, runner_cpus, **resources)
        connect(cluster, log_to_driver)
        # Functions of this module run in the actors, where benchmarks/ is not importable.
        ray.cloudpickle.register_pickle_by_value(benchmarks.cluster_lib)
        yield cluster, nodes
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
        if previous is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = previous


def start_cluster(runner_nodes: int = 2, runner_cpus: float = 1, **resources: float):
    """A head node (1 CPU) and ``runner_nodes`` worker nodes with {runner_node: 1, **resources}; returns the
    Cluster and the worker nodes. Connect with :func:`connect`; :func:`local_cluster` does both, isolated."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "object_store_memory": OBJECT_STORE,
            "_system_config": HEAD_SYSTEM_CONFIG,
        },
    )
    nodes = [add_runner_node(cluster, runner_cpus, **resources) for _ in range(runner_nodes)]
    cluster.wait_for_nodes()
    return cluster, nodes


def add_runner_node(cluster, num_cpus: float = 1, **resources: float):
    resources = {"runner_node": 1, **resources}
    return cluster.add_node(num_cpus=num_cpus, resources=resources, object_store_memory=OBJECT_STORE)


def connect(cluster, log_to_driver: bool = False) -> None:
    import ray

    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=log_to_driver)


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def wait_for_alive_nodes(count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(alive_nodes()) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(alive_nodes())} alive Ray nodes after {timeout_s:.0f} s, expected {count}"
            )
        time.sleep(0.2)


def runner_nodes(algo) -> dict[int, str]:
    """Env runner index -> the Ray node id it runs on."""
    import ray

    pairs = algo.env_runner_group.foreach_env_runner(
        lambda r: (r.worker_index, ray.get_runtime_context().get_node_id()), local_env_runner=False
    )
    return dict(pairs)


class RemoveDuring:
    """Removes ``node`` from ``cluster`` (every process of it killed) at a random moment of iteration
    ``iteration`` (1-based): ``delay_s`` (drawn from [0, ``within_s``)) after the training loop announces it
    with :meth:`starting`. ``during`` is the iteration announced last when the node went."""

    def __init__(self, cluster, node, iteration: int, within_s: float, rng):
        import threading

        self.cluster, self.node, self.iteration = cluster, node, iteration
        self.delay_s = rng.uniform(0, within_s)
        self.current, self.during = 0, None
        self._go, self.removed = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._remove, daemon=True)
        self._thread.start()

    def starting(self, iteration: int) -> None:
        self.current = iteration
        if iteration == self.iteration:
            self._go.set()

    def _remove(self) -> None:
        self._go.wait()
        time.sleep(self.delay_s)
        self.during = self.current
        self.cluster.remove_node(self.node)
        self.removed.set()

    def join(self) -> None:
        self._go.set()  # a loop that ended first: removed now
        self._thread.join()


def wait_for_runners(algo, timeout_s: float = 120.0) -> float:
    """Until every remote env runner is back in service (restarted by Ray, restored by RLlib); the seconds.
    A ping first: a runner lost since its last call is only known once a call to it fails."""
    group = algo.env_runner_group
    start = time.monotonic()
    group.foreach_env_runner(lambda r: None, local_env_runner=False)
    while len(group.healthy_env_runner_ids()) < group.num_remote_workers():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"env runners not back after {timeout_s:.0f} s")
        time.sleep(0.5)
        algo.restore_env_runners(group)
    return time.monotonic() - start


def created_bytes() -> dict[str, int]:
    """Node id -> bytes ever created in its object store (objects put there or pulled to it), from each
    raylet's counters (over its gRPC port: needs grpcio, in the dev extra)."""
    from ray._private.internal_api import node_stats

    out = {}
    for n in alive_nodes():
        reply = node_stats(n["NodeManagerAddress"], n["NodeManagerPort"], include_memory_info=False)
        out[n["NodeID"]] = int(reply.store_stats.cumulative_created_bytes)
    return out


def settled_created_bytes(timeout_s: float = 5.0) -> dict[str, int]:
    """:func:`created_bytes` once two reads 0.2 s apart agree (the raylets update their counters
    asynchronously)."""
    last, deadline = created_bytes(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = created_bytes()
        if now == last:
            break
        last = now
    return last


def timed_sync(algo) -> dict:
    """One weight sync from the learners to every remote env runner (rllib/weight_sync.py), waited for.

    Returns the seconds until every runner has set the weights, how many objects the sync put and their
    bytes (what ``ray.put`` returned during the sync: the state is put
    once), and the bytes each node's object store took in meanwhile: the put on the driver's node, one pull
    on each node whose runners read it (however many runners it has)."""
    import ray
    from ray.experimental import get_object_locations

    from rllib_treerpo.rllib.weight_sync import WeightSync

    group = algo.env_runner_group
    refs, put = [], ray.put

    def recording_put(value, **kwargs):
        refs.append(put(value, **kwargs))
        return refs[-1]

    # Nothing else queued on the runners: the time below is the sync's alone.
    group.foreach_env_runner(lambda r: None, local_env_runner=False)
    before = settled_created_bytes()
    ray.put = recording_put
    try:
        start = time.perf_counter()
        WeightSync()(algo.learner_group, group, algo.config, version=algo.iteration)
        # An actor runs its calls in order: this answers once every runner has set the synced weights.
        group.foreach_env_runner(lambda r: r._weights_seq_no, local_env_runner=False)
        seconds = time.perf_counter() - start
    finally:
        ray.put = put
    after = settled_created_bytes()
    sizes = [int(where["object_size"]) for where in get_object_locations(refs).values()]
    return {
        "seconds": seconds,
        "objects_put": len(refs),
        "object_bytes": sum(sizes),
        "node_bytes": {n: after[n] - before.get(n, 0) for n in after},
    }


def weights_bytes(algo) -> int:
    """Bytes of the state one weight sync sends (the learner's inference-only module state)."""
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE

    state = algo.learner_group.get_state(
        components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}", inference_only=True
    )[COMPONENT_LEARNER][COMPONENT_RL_MODULE]
    return int(sum(v.numel() * v.element_size() for m in state.values() for v in m.values()))


# --- a node that does not see a folder
# -----------------------------------------------------------------------------
def can_hide_folders() -> str | None:
    """None when :class:`HiddenNode` works here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unprivileged mount namespaces are not allowed here ({probe.stderr.strip()[:80]})"
    return None


class HiddenNode:
    """A Ray worker node (`ray start --block`) whose processes see an empty tmpfs at ``hide``: for them the
    folders below it do not exist, as on a machine that never had them; ``env``: its processes' environment
    variables. Stop with :meth:`stop`."""

    def __init__(
        self,
        address: str,
        hide: Path,
        resources: dict,
        num_cpus: float = 1,
        env: dict | None = None,
        log: Path | None = None,
    ):
        import json
        import shlex

        before = len(alive_nodes())
        ray_cli = Path(sys.executable).with_name("ray")
        assign = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in (env or {}).items())
        start = (
            f"env {assign} {ray_cli} start --block --address={address} --num-cpus={num_cpus} "
            f"--resources='{json.dumps(resources)}' --object-store-memory={OBJECT_STORE} "
            "--disable-usage-stats"
        )
        self.proc = subprocess.Popen(
            ["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs tmpfs {hide} && exec {start}"],
            start_new_session=True,
            stdout=open(log or os.devnull, "w"),
            stderr=subprocess.STDOUT,
        )
        wait_for_alive_nodes(before + 1)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
