"""Every snippet of README.md runs as written: ```python blocks as scripts, `>>>` blocks as doctests,
```bash blocks line by line, each in a fresh directory with the installed package (as a new user would).

`pip install ...` prefixes are dropped: the package is already installed, as .ci/run does. The test-suite
command is not run (it is this suite). The commands of `QUICK` run as written plus a few flags that make
them shorter. Snippets that train, or that run a benchmark, are `slow`.
"""

import doctest
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)
NOT_RUN = {"python -m pytest -q -n 2": "it is this test suite",
           # tests/test_benchmarks.py runs these at test size and checks what they print
           "benchmarks/compile_time.py": "test_compile_time_small",
           "benchmarks/train_step_vs_torch.py --model llama":
               "test_train_step_vs_torch_llama_is_transformers_model_on_the_same_weights",
           "benchmarks/long_context.py": "test_long_context_quick_runs_every_configuration",
           "benchmarks/gpu_mfu.py": "test_gpu_mfu_tiny_on_cpu"}
SLOW = ("lecture3 train", "benchmarks/", "--workdir runs/default", "lecture3.train(")
# command as the README writes it -> flags appended when the test runs it (the last of a flag wins).
# The quick start trains the default run, 600 steps, minutes on 2 cores; 20 steps still warm up, evaluate
# and checkpoint twice, and sample. The train-step benchmark starts a worker per variant (14, each
# compiling); the test runs one of each kind: each step function (lecture3, lean; torch math, sdpa),
# torch threads, and one without lecture3's CPU settings
# (no XLA flag, glibc's malloc, one pass). (A model change, scan or
# bf16, is the same worker with another ModelConfig; tests/test_model.py checks those configs.)
QUICK = {
    "lecture3 train": "--train.steps 20 --train.warmup-steps 2 --train.eval-every 10 --train.checkpoint-every 10",
    "python benchmarks/train_step_vs_torch.py --quick":
        "--variants jax,torch,torch_1t,torch_sdpa,jax_xla_defaults,jax_lean",
    "python benchmarks/decode_kv_cache.py --vs-hf": "--quick --rounds 1",
}


def snippets() -> list:
    """(id, language, code) of every block, the id from its section heading."""
    out, counts = [], {}
    for m in BLOCK.finditer(README):
        heading = re.findall(r"^## (.+)$", README[: m.start()], re.M)
        name = re.sub(r"\W+", "-", (heading[-1] if heading else "top").lower()).strip("-")
        counts[name] = counts.get(name, 0) + 1
        ident = f"{name}-{counts[name]}"
        slow = any(s in m[2] for s in SLOW)
        out.append(pytest.param(m[1], m[2], id=ident, marks=[pytest.mark.slow] if slow else []))
    return out


def script(block: str) -> str:
    """The block as a bash script: `pip install ... &&` prefixes dropped, the NOT_RUN commands left out,
    the QUICK commands given their flags (before a trailing `# comment`)."""
    lines = [quick(re.sub(r"^pip install [^&]*&&\s*", "", line)) for line in block.splitlines()]
    return "".join(f"{line}\n" for line in lines
                   if not line.startswith("pip install") and not any(text in line for text in NOT_RUN))


def quick(line: str) -> str:
    command, comment = re.fullmatch(r"(.*?)(\s+#.*)?", line).groups()
    return f"{command} {QUICK[command]}{comment or ''}" if command in QUICK else line


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A new user's environment: a data cache shared by this module's snippets, and the machine's devices
    (not the 8 simulated ones of conftest)."""
    env = {**os.environ, "LECTURE3_DATA_DIR": str(tmp_path_factory.mktemp("data-cache"))}
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    return env


def clone_dir(path: pathlib.Path) -> pathlib.Path:
    """A fresh working directory with the clone's benchmarks/, as in a checkout (runs/ starts empty)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "benchmarks").symlink_to(ROOT / "benchmarks")
    return path


@pytest.fixture(scope="module")
def default_run(env, tmp_path_factory):
    """A directory with runs/default, which the Generate snippet continues: a short run of the quick
    start's command (the quick-start test runs it, with its end-of-run sample, which this one skips)."""
    cwd = clone_dir(tmp_path_factory.mktemp("default-run"))
    run(["lecture3", "train", "--train.steps", "10", "--train.log-every", "5", "--train.sample-tokens", "0"], cwd, env)
    return cwd


def run(argv, cwd, env, timeout=900):
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_readme_has_the_snippets_this_test_runs():
    langs = [p.values[0] for p in snippets()]
    assert langs.count("python") >= 4 and langs.count("bash") >= 8
    assert "pip install -e . && lecture3 train" in README


@pytest.mark.parametrize("lang,code", snippets())
@pytest.mark.slow
def test_snippet_runs_as_written(lang, code, env, tmp_path, request):
    home = clone_dir(tmp_path / "clone")
    if lang == "python" and code.lstrip().startswith(">>>"):
        test = doctest.DocTestParser().get_doctest(code, {}, "README", "README.md", 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        runner.run(test)
        assert runner.summarize(verbose=False).failed == 0
        return
    if lang == "python":
        run([sys.executable, "-c", code], home, env)
        return
    if "--workdir runs/default" in code:
        home = request.getfixturevalue("default_run")
    run(["bash", "-e", "-o", "pipefail", "-c", script(code)], home, env)


def test_script_drops_the_install_and_the_test_suite():
    assert script("pip install -e . && lecture3 train\n") == f"lecture3 train {QUICK['lecture3 train']}\n"
    assert script('pip install -e ".[test]" && python -m pytest -q -n 2\n') == ""
    assert script("a --x 1 \\\n    --y 2\n") == "a --x 1 \\\n    --y 2\n"


def test_a_benchmark_left_out_here_is_run_by_the_test_it_names():
    source = (ROOT / "tests" / "test_benchmarks.py").read_text()
    for command, test in NOT_RUN.items():
        if command.startswith("benchmarks/"):
            assert command in README and f"def {test}(" in source, command


def test_quick_flags_go_to_exactly_the_commands_the_readme_writes():
    assert script("lecture3 train --preset gemma2:tiny\n") == "lecture3 train --preset gemma2:tiny\n"
    bench = "python benchmarks/train_step_vs_torch.py --quick"
    assert script(f"{bench}   # JAX vs PyTorch\n") == f"{bench} {QUICK[bench]}   # JAX vs PyTorch\n"
    written = {quick_line for _, code in (p.values for p in snippets()) for quick_line in script(code).splitlines()}
    for command, flags in QUICK.items():  # a command the README no longer writes would run in full unnoticed
        assert any(line.startswith(f"{command} {flags}") for line in written), command


def test_core_dependencies_are_what_the_package_imports():
    """pyproject's dependencies are the distributions lecture3/ imports (anywhere, lazily included), the
    `hf` extra holds the two only lecture3.hf imports, and nothing else is core (matplotlib is `plot`, pandas
    `pandas`, gguf `notebooks`)."""
    import ast
    import importlib.metadata
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[<>=\[ ;]", r)[0].lower().replace("_", "-") for r in reqs if not r.startswith("lecture3")}

    imported = set()
    for path in (ROOT / "lecture3").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    dists = importlib.metadata.packages_distributions()
    used = {d.lower().replace("_", "-") for m in imported - set(sys.stdlib_module_names) - {"lecture3"}
            for d in dists.get(m, [m])}
    extras = project["optional-dependencies"]
    assert names(extras["hf"]) == {"transformers", "safetensors"}
    optional = set().union(*(names(extras[e]) for e in ("hf", "pandas", "plot", "notebooks")))
    assert used - optional == names(project["dependencies"])
    assert {"lecture3[hf,plot,pandas]"} <= set(extras["test"]) and "matplotlib" in names(extras["plot"])
