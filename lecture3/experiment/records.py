"""Run records: one small JSON file per finished run, written atomically, read back by key.

A record holds the full config, the commit and whether the tree was clean, the machine (CPU model,
device kind, jax version), the command that reproduces that single run, the wall time and the result
(see `lecture3.experiment.runs`). A run killed half-way leaves no record and is simply redone.

What produced it, wherever it ran (`lecture3_source`, `claim_source`): lecture3's version and commit (of
the checkout it runs from, or stamped into the package when it was built), the claim file's sha256 and,
when the claim's folder is a git work tree, its commit and the files not committed there.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
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


def commit() -> str | None:
    return git(REPO, "rev-parse", "HEAD")


BUILD_STAMP = Path(__file__).resolve().parents[1] / "_build.json"  # written into a wheel by setup.py


def git(folder: Path, *args: str) -> str | None:
    """`git ARGS` run in `folder`: its output, or None when git fails or is missing."""
    try:
        out = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.rstrip() if out.returncode == 0 else None


@functools.cache
def is_checkout() -> bool:
    """lecture3 runs from its own git checkout (an editable install or the source tree), not from a
    package installed into site-packages (which may sit inside some other repository)."""
    top = git(REPO, "rev-parse", "--show-toplevel")
    return top is not None and Path(top).resolve() == REPO.resolve()


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("lecture3")
    except metadata.PackageNotFoundError:
        return None


def lecture3_source() -> dict:
    """lecture3's version and commit: the checkout's HEAD and whether its code is committed, or, for an
    installed package, the commit it was built from (stamped by setup.py; None for a build without git)."""
    if is_checkout():
        return {"version": _version(), "commit": commit(), "clean": not uncommitted(), "installed": "checkout"}
    stamp = json.loads(BUILD_STAMP.read_text()) if BUILD_STAMP.is_file() else {}
    return {"version": _version(), "commit": stamp.get("commit"), "clean": stamp.get("clean"),
            "installed": "package"}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git_state(folder: Path) -> dict | None:
    """The git work tree holding `folder`: its commit and the code files (.py) under `folder` that are
    changed or untracked; None when `folder` is in no work tree."""
    if git(folder, "rev-parse", "--is-inside-work-tree") != "true":
        return None
    out = git(folder, "status", "--porcelain", "--untracked-files=all", "--", ".") or ""
    files = [line[3:] for line in out.splitlines() if line.strip() and line.endswith(".py")]
    return {"commit": git(folder, "rev-parse", "HEAD"), "clean": not files, "uncommitted": files}


def claim_source(path: Path, in_package: bool = False) -> dict:
    """The claim file: its path, sha256 and the git state of its folder (none for the copy of the lecture's
    claims inside an installed package: lecture3's own version and commit say where that came from)."""
    path = Path(path).resolve()
    return {"path": str(path), "sha256": sha256(path), "git": None if in_package else git_state(path.parent)}


def uncommitted(paths=("lecture3", "experiments")) -> list[str]:
    """Changed or untracked code files under `paths` (results and reports do not count)."""
    out = git(REPO, "status", "--porcelain", "--untracked-files=all", "--", *paths)
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
