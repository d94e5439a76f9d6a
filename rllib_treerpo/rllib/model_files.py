"""A model folder on the driver's node only: env runners and learners on other nodes get it through Ray's
object store.

On a Ray cluster each env runner and learner loads ``model_name_or_path`` on its own node. A node without that
folder (it was written on the head node only: `treerpo get-model`, the embedded warm-started model) asks the
driver's :class:`ModelFolderServer` for it. The server, started on the driver's node when TreeRPO is built on
a cluster of several nodes (:func:`serve_model_folder`), reads the folder once, when first asked, into one
object in the object store (every file: config, tokenizer, weights). Each node pulls that object once, writes
it to a node-local folder shared by the actors of that node (:func:`node_cache_root`) and loads from there;
weight syncs then replace the weights as usual. When every node has the folder (shared storage, or copied to
each node) the server is never asked and reads nothing. The object lives as long as the driver (a runner
restarted on a new node needs it again): for a model of many GB prefer shared storage (docs/cluster.md).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

SERVER_PREFIX = "treerpo_model_folder:"
READY = ".treerpo_complete"  # written last into a node-local copy: the copy is whole


def server_name(model_name_or_path: str) -> str:
    """The named actor serving ``model_name_or_path`` in this job's namespace."""
    return SERVER_PREFIX + model_name_or_path


def folder_digest(folder: Path) -> str:
    """Names, sizes and modification times of the folder's files: a changed folder gets a new node copy
    (cheap: no file content is read)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_folder(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


class ModelFolderServer:
    """Ray actor on the driver's node: the folder as one object-store object, read on the first request."""

    def __init__(self, folder: str):
        self.folder = Path(folder).expanduser()
        self.ref = None
        self.digest = ""
        self.requests = 0

    def files(self) -> tuple[str, list]:
        """(digest, [ref]): the ref in a list, so that Ray hands it over unresolved (each caller pulls it)."""
        import ray

        self.requests += 1
        if self.ref is None:
            self.digest = folder_digest(self.folder)
            self.ref = ray.put(read_folder(self.folder))
        return self.digest, [self.ref]

    def stats(self) -> dict:
        return {"requests": self.requests, "served": self.ref is not None, "digest": self.digest}


def several_nodes() -> bool:
    import ray

    return ray.is_initialized() and sum(1 for n in ray.nodes() if n.get("Alive")) > 1


def serve_model_folder(model_name_or_path: str | None) -> Any:
    """On the driver: when Ray has several nodes and ``model_name_or_path`` is a folder here, the (named)
    server of that folder on this node; else None. Cheap: the folder is read only when a node asks."""
    if not model_name_or_path or not Path(model_name_or_path).expanduser().is_dir() or not several_nodes():
        return None
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(ModelFolderServer)
        .options(
            name=server_name(model_name_or_path),
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=8,  # runners of many nodes asking at once
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        )
        .remote(str(Path(model_name_or_path).expanduser().resolve()))  # the actor's cwd is not the driver's
    )


def node_cache_root() -> Path:
    """Where a node keeps the model folders it received: $TREERPO_NODE_MODELS, else <tmp>/treerpo-models."""
    return Path(os.environ.get("TREERPO_NODE_MODELS") or Path(tempfile.gettempdir()) / "treerpo-models")


def looks_local(model_name_or_path: str) -> bool:
    return model_name_or_path.startswith(("/", ".", "~"))


def local_model_folder(model_name_or_path: str | None, *, who: str = "an env runner") -> str | None:
    """In an env runner or learner: ``model_name_or_path`` when this node has it (or it is a hub name and no
    driver serves a folder of that name), else the driver's copy written to this node. A local path that
    neither this node nor the driver has is one ValueError saying what must be shared."""
    import ray

    if not model_name_or_path or Path(model_name_or_path).expanduser().is_dir() or not ray.is_initialized():
        return model_name_or_path

    try:
        server = ray.get_actor(server_name(model_name_or_path))
    except ValueError:
        if not looks_local(model_name_or_path):
            return model_name_or_path  # a hub name: from_pretrained fetches or finds it in the HF cache
        raise ValueError(
            f"config field 'model_name_or_path' = {model_name_or_path!r}: no such folder on node "
            f"{ray.util.get_node_ip_address()} ({who}), and the driver does not have it either: put the "
            "model folder at this path on every node, or on storage every node mounts (docs/cluster.md)"
        ) from None
    digest, [ref] = ray.get(server.files.remote())
    target = node_cache_root() / f"{Path(model_name_or_path).name}-{digest}"
    if not (target / READY).exists():
        write_folder(ray.get(ref), target)
    return str(target)


def write_folder(files: dict[str, bytes], target: Path) -> None:
    """Write ``files`` to ``target`` atomically: the actors of one node may race; the first rename wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        (tmp / READY).write_text("")
        os.rename(tmp, target)
    except OSError:
        if not (target / READY).exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
