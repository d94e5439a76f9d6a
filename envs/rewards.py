"""Verifiable math reward: math-verify, bounded in time, safe in any thread (docs/algorithm.md s.2).

Why a helper process. math-verify bounds its own work with ``signal.alarm``, which only works in a
process's main thread (a ValueError elsewhere, e.g. in threaded or async Ray actors),
and no signal can interrupt a long C-level computation. So verification runs in persistent helper
processes, each a fresh interpreter (``python -c``: exec'd, never a bare fork of a process whose
torch/Ray threads may be live; like multiprocessing's "spawn", minus re-importing the caller's
``__main__`` or this package). In the helper's main thread math-verify's own integer timeouts end
most slow cases cleanly; the caller additionally enforces a hard wall-clock limit and kills and
replaces a helper that overruns it, returning 0.0.

- Helpers start lazily, are reused across calls, and form a small pool (one per concurrently
  calling thread, up to ``MAX_WORKERS``), so thread pools verify in parallel.
- Cheap pre-screening in the caller: only the last ``MAX_RESPONSE_CHARS`` characters of a
  response are verified (the final answer is at the end), and text nested deeper than
  ``MAX_NESTING_DEPTH`` brackets scores 0.0 at once (degenerate output would cost a timeout each).
- Gold answers are parsed once per helper (LRU cache): a tree scores hundreds of leaves per answer.
- Nothing here evaluates model text as code; math-verify's parser is the only interpreter.
- Helpers exit when their stdin closes (also when the caller dies) and are shut down at exit. One found dead
  (killed while idle) is replaced before it gets a request; one killed under a call scores 0.0 (a warning).

The helper side is envs/verify_helper.py (loaded standalone by path); the text helpers are envs/math_text.py,
re-exported here.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from typing import Any

from envs.math_text import gold_latex, has_closed_boxed, last_boxed, nesting_depth

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MAX_WORKERS",
    "can_parse_answer",
    "gold_latex",
    "has_closed_boxed",
    "last_boxed",
    "math_reward",
    "nesting_depth",
    "shutdown",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S: float = 5.0  # hard wall-clock bound of one call, helper start-up excluded
MAX_WORKERS: int = max(1, min(4, os.cpu_count() or 1))  # read when the pool is (re)created
MAX_RESPONSE_CHARS: int = 8192
MAX_NESTING_DEPTH: int = 64
STARTUP_TIMEOUT_S: float = 120.0
WORKER_MEMORY_LIMIT_MB: int = 4096  # address-space limit of a helper: big-number bombs fail fast
HELPER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "verify_helper.py")


def _inner_timeout(timeout_s: float) -> int:
    """math-verify's own timeouts must be integers (0.5 silently fails)."""
    return max(1, int(timeout_s // 3))


# ---------------------------------------------------------------------------- caller side
class _WorkerError(Exception):
    """The helper overran its time or died; it has been killed."""


class _HelperDied(_WorkerError):
    """The helper exited (killed from outside, crashed) while it held a request."""


class _HelperGone(_WorkerError):
    """The helper was dead before it got the request: the request can go to another helper."""


_BOOTSTRAP = (
    "import importlib.util as u, sys\n"
    "s = u.spec_from_file_location('_treerpo_reward_helper', sys.argv[1])\n"
    "m = u.module_from_spec(s)\n"
    "s.loader.exec_module(m)\n"
    "m.serve(int(sys.argv[2]))\n"
)


class _Worker:
    """One helper process speaking JSON lines over its stdin/stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, HELPER_PATH, str(WORKER_MEMORY_LIMIT_MB)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            close_fds=True,
            start_new_session=True,  # a terminal's Ctrl-C goes to the caller, not the helpers
        )
        self._buf = b""
        try:
            if self._read_line(STARTUP_TIMEOUT_S) != b'"ready"':
                raise _WorkerError("unexpected greeting")
        except _WorkerError as e:
            self.kill()
            raise RuntimeError(
                f"the math-verify helper process failed to start ({e}); is math-verify installed "
                f"for {sys.executable}?"
            ) from None

    def request(self, payload: dict[str, Any], timeout_s: float) -> Any:
        data = (json.dumps(payload) + "\n").encode("ascii")
        try:
            fd = self.proc.stdin.fileno()  # type: ignore[union-attr]
            view = memoryview(data)
            while view:  # the helper is idle in readline, so this cannot block for long
                view = view[os.write(fd, view) :]
        except OSError as e:
            self.kill()
            raise _HelperGone(f"helper was gone: {e}") from None
        return json.loads(self._read_line(timeout_s))

    def _read_line(self, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        poller = select.poll()  # not select.select: Ray processes may hold fds >= 1024
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(max(1, int(remaining * 1000))):
                self.kill()
                raise _WorkerError(f"no answer within {timeout_s:.1f} s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self.kill()
                raise _HelperDied(f"helper exited with code {self.proc.returncode}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()  # reap: no zombies
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()

    def hang_up(self) -> None:
        """EOF on the helper's stdin: it finishes its loop and exits."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass

    def close(self, wait_s: float = 1.0) -> None:
        """Polite stop; kill the helper if it has not exited within ``wait_s``."""
        self.hang_up()
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class _Pool:
    """Idle helpers plus a bound on how many exist; one helper serves one call at a time."""

    def __init__(self, max_workers: int) -> None:
        self.pid = os.getpid()
        self.max_workers = max(1, int(max_workers))
        self._idle: list[_Worker] = []
        self._count = 0  # live helpers plus reserved slots being started
        self._all: set[_Worker] = set()
        self._cond = threading.Condition()
        self._closed = False

    def call(self, payload: dict[str, Any], timeout_s: float) -> Any:
        """One request on an idle (or new) helper; when the helper was dead before it got the request (killed
        while idle), the request goes to another helper, once."""
        try:
            return self._call_once(payload, timeout_s)
        except _HelperGone:
            return self._call_once(payload, timeout_s)

    def _call_once(self, payload: dict[str, Any], timeout_s: float) -> Any:
        worker = self._acquire()
        healthy = False
        try:
            result = worker.request(payload, timeout_s)
            healthy = True
            return result
        finally:
            self._release(worker, healthy)

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("envs.rewards was shut down")
                while self._idle and self._idle[-1].proc.poll() is not None:  # died while idle: reap it
                    dead = self._idle.pop()
                    self._all.discard(dead)
                    self._count -= 1
                    dead.kill()
                if self._idle:
                    return self._idle.pop()
                if self._count < self.max_workers:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            worker = _Worker()  # started outside the lock: other threads keep using idle helpers
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._all.add(worker)
        return worker

    def _release(self, worker: _Worker, healthy: bool) -> None:
        keep = healthy and not self._closed
        with self._cond:
            if keep:
                self._idle.append(worker)
            else:
                self._all.discard(worker)
                self._count -= 1
            self._cond.notify()
        if not healthy:
            worker.kill()  # it overran, died, or the call was interrupted mid-request
        elif not keep:
            worker.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
            self._idle.clear()
            self._count = 0
            self._cond.notify_all()
        for w in workers:
            w.hang_up()  # all at once, then wait: exit is not serialised over the helpers
        for w in workers:
            w.close()


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def _get_pool() -> _Pool:
    global _pool
    with _pool_lock:
        # After os.fork() the inherited helpers belong to the parent: start our own.
        if _pool is None or _pool.pid != os.getpid():
            _pool = _Pool(MAX_WORKERS)
        return _pool


def shutdown() -> None:
    """Stop all helper processes (registered with atexit; the next call starts new ones)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


atexit.register(shutdown)


def math_reward(response: str, answer: str, *, timeout_s: float | None = None) -> float:
    """1.0 exactly when math-verify verifies ``response`` against the gold ``answer``, else 0.0.

    The gold is parsed as ``$answer$`` unless it already contains ``$`` or ``\\boxed``. Returns 0.0
    when the check exceeds ``timeout_s`` seconds (default ``DEFAULT_TIMEOUT_S``; helper start-up not
    counted) or the response fails the pre-screen (module docstring). Thread-safe.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    answer = str(answer)
    text = response[-MAX_RESPONSE_CHARS:]
    if not text.strip() or not answer.strip():
        return 0.0
    if nesting_depth(text) > MAX_NESTING_DEPTH or nesting_depth(answer) > MAX_NESTING_DEPTH:
        return 0.0
    timeout = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
    payload = {"op": "reward", "response": text, "gold": gold_latex(answer), "t": _inner_timeout(timeout)}
    try:
        return float(_get_pool().call(payload, timeout))
    except _WorkerError as e:
        # A timeout is the verdict on a hostile input; a helper that died under a call was killed or crashed.
        (logger.warning if isinstance(e, _HelperDied) else logger.debug)("math_reward scored 0.0: %s", e)
        return 0.0


def can_parse_answer(answer: str, *, timeout_s: float | None = None) -> bool:
    """True when math-verify parses the gold ``answer`` to a mathematical object, not just its raw string."""
    answer = str(answer)
    if not answer.strip() or nesting_depth(answer) > MAX_NESTING_DEPTH:
        return False
    timeout = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
    payload = {"op": "parse", "gold": gold_latex(answer), "t": _inner_timeout(timeout)}
    try:
        return bool(_get_pool().call(payload, timeout))
    except _WorkerError:
        return False
