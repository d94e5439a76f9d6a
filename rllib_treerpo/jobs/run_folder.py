"""A `treerpo train` output folder: what it holds, how it starts, resumes and records, never losing a run.

- A new run refuses a folder that already holds one (one line: --resume it, --overwrite it, or another
  --output); ``--overwrite`` removes only what a run writes.
- ``--resume`` needs a checkpoint: a folder whose run never finished a checkpointed iteration is refused.
- Checkpoints: ``checkpoints/iter_NNNNNN``, ``checkpoints/latest`` switched by an atomic rename (a kill during
  a save resumes from the previous one), the last two kept by iteration number (never by name).
- metrics.jsonl: one JSON object per line; a non-finite number is written as null (bare NaN is not JSON).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

# Everything a run writes (and --overwrite removes); anything else in the folder is left alone.
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "learning_curve.png",
    "eval_before.json",
    "eval_before.jsonl",
    "eval_after.json",
    "eval_after.jsonl",
)
RUN_DIRS = ("checkpoints", "final_model", "trees", "tb")
KEEP_CHECKPOINTS = 2


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (valid JSON), in nested dicts and lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    """Atomic: a temporary file, then a rename."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(finite(value), indent=2))
    tmp.rename(path)


class RunFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()  # RLlib checkpoints need absolute paths ("URI has empty scheme")
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"

    # --- starting -------------------------------------------------------------------------------------
    def holds_a_run(self) -> bool:
        return any((self.path / name).exists() for name in (*RUN_FILES, *RUN_DIRS))

    def check_new(self, overwrite: bool) -> None:
        """Before a new run: refuse a folder holding another one unless ``overwrite`` (then clear the run's
        files)."""
        if not self.holds_a_run():
            return
        if not overwrite:
            done = self.last_row_iteration()
            what = f"a run ({done} iterations recorded)" if done else "a run's files"
            raise ValueError(
                f"{self.path} already holds {what}: continue it with --resume {self.path}, start it "
                "over with --overwrite, or choose another --output"
            )
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(self.path / name, ignore_errors=True)

    def check_resume(self) -> Path:
        """The checkpoint a resume starts from; a folder without one is refused in one line."""
        if not (self.path / "config.yaml").is_file():
            raise ValueError(
                f"--resume {self.path}: no config.yaml there; is it a `treerpo train` output folder?"
            )
        checkpoint = self.latest_checkpoint()
        if checkpoint is None:
            raise ValueError(
                f"--resume {self.path}: the run never saved a checkpoint, so there is nothing to resume; "
                f"start it again with --overwrite"
            )
        return checkpoint

    # --- checkpoints ----------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        from rllib_treerpo.models.model_io import latest_checkpoint

        return latest_checkpoint(self.checkpoints) if self.checkpoints.is_dir() else None

    def save_checkpoint(self, algo, iteration: int) -> None:
        """Save, then point ``latest`` at it (atomic rename); keep the last two by iteration number."""
        name = f"iter_{iteration:06d}"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        algo.save_to_path(str(self.checkpoints / name))
        tmp = self.checkpoints / "latest.tmp"
        tmp.write_text(name)
        tmp.rename(self.checkpoints / "latest")
        for old in self._stale(iteration):
            shutil.rmtree(old, ignore_errors=True)

    def _stale(self, iteration: int) -> list[Path]:
        """Checkpoints to delete after saving ``iteration``: all but the last two up to it (by iteration
        number, not by name), and any numbered above it (the future of a run that was started over)."""
        numbered = {
            int(p.name.removeprefix("iter_")): p
            for p in self.checkpoints.glob("iter_*")
            if p.name.removeprefix("iter_").isdigit()
        }
        kept = sorted(n for n in numbered if n <= iteration)[-KEEP_CHECKPOINTS:]
        return [p for n, p in numbered.items() if n not in kept]

    # --- metrics --------------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def append(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(finite(row)) + "\n")

    def truncate(self, iteration: int) -> None:
        """Drop rows past the restored iteration (they belong to the iteration(s) lost in the
        interruption)."""
        if self.metrics.exists():
            keep = [r for r in self.rows() if r["iteration"] <= iteration]
            self.metrics.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def last_row_iteration(self) -> int:
        rows = self.rows() if self.metrics.exists() else []
        return max((r.get("iteration", 0) for r in rows), default=0)

    def total(self, key: str) -> float:
        return sum(r.get(key) or 0.0 for r in self.rows())

    # --- summary --------------------------------------------------------------------------------------
    def summary(self) -> dict:
        path = self.path / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / "summary.json", summary)
