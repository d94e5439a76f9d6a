"""The helper process of envs/rewards.py: math-verify in a fresh interpreter's main thread.

envs/rewards.py starts ``python -c`` with a bootstrap that loads this file by path (not the ``envs`` package,
whose imports would pull in gymnasium and more) and calls :func:`serve`. Keep its top-level imports to the
standard library; math-verify is imported inside :func:`serve`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any


def serve(memory_limit_mb: int) -> None:
    """Main loop of a helper process: one JSON request per stdin line, one JSON answer per line."""
    import functools

    proto = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints (Python or C) must not corrupt the protocol on stdout
    sys.stdout = sys.stderr
    try:
        import resource

        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    logging.basicConfig(level=logging.ERROR)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # it logs every timeout with the input
    from math_verify import parse, verify

    @functools.lru_cache(maxsize=4096)
    def parse_gold(gold: str, t: int) -> tuple[Any, ...]:
        return tuple(parse(gold, parsing_timeout=t))

    def handle(req: dict[str, Any]) -> Any:
        t = int(req["t"])
        if req["op"] == "parse":
            # math-verify falls back to the raw string when it understands nothing ("???", "\\frac{"):
            # parseable means at least one mathematical (non-string) object.
            return any(not isinstance(x, str) for x in parse_gold(req["gold"], t))
        gold = parse_gold(req["gold"], t)
        if not gold:
            return 0.0
        pred = parse(req["response"], parsing_timeout=t)
        return 1.0 if pred and verify(list(gold), pred, timeout_seconds=t) else 0.0

    proto.write(b'"ready"\n')
    for line in sys.stdin.buffer:
        try:
            result = handle(json.loads(line))
        except Exception:  # noqa: BLE001 - any failure of the verifier is "not verified"
            result = 0.0
        proto.write((json.dumps(result) + "\n").encode("ascii"))
