"""Run records: one small JSON file per finished run, written atomically, read back by key.

A record holds the full config, the commit and whether the tree was clean, the machine (CPU model,
device kind, jax version), the command that reproduces that single run, the wall time and the result
(see `lecture3.experiment.runs`). A run killed half-way leaves no record and is simply redone.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import subprocess
from pathlib import Path

from lecture3.errors import Lecture3Error
from lecture3.runtime import ENVIRONMENT_KEYS, cpu_id, environment, environment_differences  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


class RecordError(Lecture3Error):
    """A record or results folder that cannot be read or written as asked."""


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> str | None:
    return _git("rev-parse", "HEAD")


def uncommitted(paths=("lecture3", "experiments")) -> list[str]:
    """Changed or untracked code files under `paths` (results and reports do not count)."""
    out = _git("status", "--porcelain", "--untracked-files=all", "--", *paths)
    if out is None:
        return []
    files = [line[3:] for line in out.splitlines() if line.strip()]
    return [f for f in files if f.endswith(".py")]


@functools.cache
def machine() -> dict:
    import jax

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": dev.platform, "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__, "python": platform.python_version()}


def _plain(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def write(folder: Path, record: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record['key']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_plain(record), indent=1, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def read_all(folder: Path) -> dict[str, dict]:
    """Every record in `folder` by key; a file that is not a valid record is an error naming it."""
    out = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
            out[rec["key"]] = rec
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise RecordError(f"{path} is not a valid run record ({e}); delete it and rerun the claim "
                              "to redo that run") from None
    return out


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
