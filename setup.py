"""The build step pyproject.toml cannot say: a wheel ships the lecture's claims and the commit it came from.

`experiments/*.py` (the claim files, which stay where they are for a checkout) are copied into the wheel
as `lecture3/claims/`, where an installed `lecture3 experiment` finds them; `lecture3/_build.json` records
the git commit of the tree the wheel was built from and whether its code was committed
(`lecture3.experiment.records.lecture3_source` reads it). An editable install reads experiments/ and git
in place, so it copies nothing.
"""

import json
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _git(*args):
    try:
        out = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.rstrip() if out.returncode == 0 else None


def build_stamp() -> dict:
    """The commit of the source tree and whether its code (lecture3/, experiments/) was committed."""
    status = _git("status", "--porcelain", "--untracked-files=all", "--", "lecture3", "experiments")
    changed = [line for line in (status or "").splitlines() if line.endswith(".py")]
    return {"commit": _git("rev-parse", "HEAD"), "clean": None if status is None else not changed}


class BuildWithClaims(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        package = Path(self.build_lib) / "lecture3"
        claims = package / "claims"
        shutil.rmtree(claims, ignore_errors=True)
        claims.mkdir(parents=True)
        for path in sorted((HERE / "experiments").glob("*.py")):
            shutil.copyfile(path, claims / path.name)
        (package / "_build.json").write_text(json.dumps(build_stamp()) + "\n")


setup(cmdclass={"build_py": BuildWithClaims})
