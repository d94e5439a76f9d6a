"""Tests of envs/rewards.py: math-verify verdicts, threads, and bounded time on hostile input."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from envs import rewards
from envs.rewards import has_closed_boxed, last_boxed, math_reward, nesting_depth

CASES = [
    ("The answer is \\boxed{\\frac{1}{2}}", "1/2", 1.0),
    ("The answer is \\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("so we get 1/2", "0.5", 1.0),
    ("\\boxed{\\frac{2}{4}}", "$\\frac{1}{2}$", 1.0),  # "$...$" gold is used as is
    ("\\boxed{\\dfrac{1}{2}}", "\\boxed{0.5}", 1.0),
    ("\\boxed{9}", "9", 1.0),
    ("\\boxed{8}", "9", 0.0),
    ("\\boxed{\\frac{1}{3}}", "1/2", 0.0),
    ("I do not know.", "9", 0.0),
    ("", "9", 0.0),
    ("\\boxed{9}", "", 0.0),
]


@pytest.mark.parametrize("response,answer,expected", CASES)
def test_verdicts(response, answer, expected):
    assert math_reward(response, answer) == expected


def test_same_verdicts_in_worker_threads():
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: math_reward(c[0], c[1]), CASES * 3))
    assert got == [c[2] for c in CASES] * 3


HOSTILE = [
    "\\boxed{9^{9^{9^{9^{9}}}}}",
    "\\boxed{10^{10^{10}}!}",
    "\\boxed{" + "{" * 3000 + "9" + "}" * 3000 + "}",
    "\\boxed{" + "(" * 3000 + "9" + ")" * 3000 + "}",
    "\\boxed{" + "(" * 5000,
    "x" * 200_000 + "\\boxed{" + "9^{" * 30 + "9" + "}" * 30 + "}",
]


@pytest.mark.parametrize("response", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_input_is_bounded(response):
    start = time.monotonic()
    assert math_reward(response, "9") == 0.0
    assert time.monotonic() - start < 10.0
    assert math_reward("\\boxed{9}", "9") == 1.0  # the verifier still works afterwards


def test_hard_timeout_kills_and_replaces_the_helper():
    assert math_reward("\\boxed{3}", "3") == 1.0
    before = set(rewards._get_pool()._all)
    start = time.monotonic()
    # The helper's own 1 s timeout is longer than 0.3 s: the caller must kill it.
    assert math_reward("\\boxed{9^{9^{9^{9}}}}", "9", timeout_s=0.3) == 0.0
    assert time.monotonic() - start < 3.0
    killed = [w for w in before if w not in rewards._get_pool()._all]
    assert killed and all(w.proc.returncode is not None for w in killed)  # reaped, no zombie
    assert math_reward("\\boxed{3}", "3") == 1.0


def test_a_helper_killed_mid_call_gives_a_verdict_in_time_and_the_pool_recovers():
    """kill -9 of the helper from another thread while a slow call runs: 0.0 at once, the next call works."""
    import signal
    import threading

    assert math_reward("\\boxed{3}", "3") == 1.0  # a helper is up (idle)
    pool = rewards._get_pool()
    result, start = {}, time.monotonic()
    # slow: math-verify's own 3 s timeout (timeout_s // 3) ends it, unless the helper is killed first
    call = threading.Thread(
        target=lambda: result.update(v=math_reward("\\boxed{9^{9^{9^{9}}}}", "9", timeout_s=9.0))
    )
    call.start()
    while not (busy := [w for w in list(pool._all) if w not in pool._idle]):
        assert time.monotonic() - start < 5, "the call never reached a helper"
        time.sleep(0.01)
    time.sleep(0.2)  # the request is in the helper's hands
    os.kill(busy[0].proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    call.join(timeout=9.0)
    assert result == {"v": 0.0} and time.monotonic() - killed_at < 1.0
    assert busy[0].proc.returncode == -signal.SIGKILL and busy[0] not in pool._all  # reaped, out of the pool
    assert pool._count == len(pool._all)
    assert math_reward("\\boxed{3}", "3") == 1.0


def test_a_helper_killed_while_idle_does_not_cost_the_next_call_its_verdict():
    import signal

    assert math_reward("\\boxed{2}", "2") == 1.0
    for worker in list(rewards._get_pool()._idle):
        os.kill(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait()
    assert math_reward("\\boxed{2}", "2") == 1.0  # was 0.0: the request went to the dead helper
    pool = rewards._get_pool()
    assert pool._count == len(pool._all) and all(w.proc.poll() is None for w in pool._all)


def test_shutdown_stops_helpers_and_next_call_restarts():
    assert math_reward("\\boxed{2}", "2") == 1.0
    procs = [w.proc for w in rewards._get_pool()._all]
    assert procs
    rewards.shutdown()
    assert all(p.returncode is not None for p in procs)
    assert math_reward("\\boxed{2}", "2") == 1.0


def test_model_text_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = (
        f"__import__('os').system('touch {marker}') \\boxed{{__import__('os').system('touch {marker}')}}"
    )
    assert math_reward(payload, "0") == 0.0
    assert not os.path.exists(marker)


def test_rejects_non_string_response():
    with pytest.raises(TypeError):
        math_reward(None, "1")  # type: ignore[arg-type]


def test_text_helpers():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} then \\boxed{2") == "1"  # the last *closed* box
    assert last_boxed("\\boxed{1} \\boxed{2}") == "2"
    assert last_boxed("no box") is None and not has_closed_boxed("\\boxed{")
    assert nesting_depth("{[()]}") == 3 and nesting_depth(")))(") == 1
    assert rewards.gold_latex("1/2") == "$1/2$" and rewards.gold_latex("$x$") == "$x$"


@pytest.mark.parametrize(
    "answer, ok",
    [("???", False), ("\\frac{", False), ("", False), ("1/2", True), ("(0,1]", True), ("\\text{yes}", True)],
)
def test_can_parse_answer_rejects_what_math_verify_only_echoes(answer, ok):
    from envs.rewards import can_parse_answer

    assert can_parse_answer(answer) is ok
