"""Run a claim's grid resumably: skip finished runs, run the rest (in this process or in worker
processes pinned one per core), write one record per run into the pool shared by every claim, then the
claim's report.

    lecture3 experiment c01                      # run what is missing of claim 1, then its report.md and plots
    lecture3 experiment c01 --run KEY            # one run of the grid (what a record's `command` says)
    lecture3 experiment tied --claims DIR        # a claim of your own, DIR/tied.py (or: experiment DIR/tied.py)

Claims are found in `--claims DIR` first, then among the lecture's: the checkout's `experiments/`, else
the copy an installed package ships (`lecture3/claims/`, made from experiments/ when the wheel is built).
A claim file is any .py file with a `CLAIM = Claim(...)` line; its name is the file's name.

Records live in one pool, `experiments/results/runs/<key>.json` for the lecture's claims (a claim of
your own: `DIR/results/runs/`; `--results ROOT` chooses): a run with the same config, measure and
arguments is one key, run and recorded once whichever claims' grids hold it (model S's baseline LR grid
serves claims 3 and 4 and gives the others "the baseline's best LR"). Reports stay per claim, in
`ROOT/<claim>/`. A grid that depends on the pool (`protocol.baseline_best_lr`) is built again after its
runs finish, and runs again until it stops growing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from lecture3 import runtime
from lecture3.errors import Lecture3Error
from lecture3.experiment import protocol, records
from lecture3.experiment.spec import Claim, Results, RunSpec, tags_match

EXPERIMENTS = records.REPO / "experiments"
PACKAGED = Path(__file__).resolve().parents[1] / "claims"  # the lecture's claims inside an installed package
RESULTS = protocol.RESULTS
QUICK_RESULTS = EXPERIMENTS / "results-quick"  # git-ignored: the tests' and a user's smoke runs
V1_RESULTS = EXPERIMENTS / "results-v1"  # protocol v1's records and reports, withdrawn, kept unchanged as history
QUICK_SEEDS = 2  # a quick grid keeps the first two seeds of each arm: a paired comparison needs two
# claims whose grids hold `protocol.baseline_specs`: `all` runs them first, so the others can read S's best LR
BASELINE_CLAIMS = ("c03", "c04")
CLAIM_LINE = re.compile(r"^CLAIM\s*(?::[^=\n]*)?=", re.M)  # what makes a .py file a claim file
TEMPLATE = Path(__file__).resolve().parent / "claim_template.py"  # what `lecture3 experiment new` writes


class ExperimentError(Lecture3Error):
    """An unknown claim, run key or flag combination of `lecture3 experiment`."""


def claim_files(folder: Path | None = None) -> list[Path]:
    """The claim files of `folder` (default: the lecture's), by name: .py files with a `CLAIM = ...` line."""
    folder = lecture_dir() if folder is None else Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.glob("*.py")) if not p.name.startswith("_") and CLAIM_LINE.search(p.read_text())]


def lecture_dir() -> Path:
    """The lecture's claims: the checkout's experiments/, else the copy inside the installed package."""
    for folder in (EXPERIMENTS, PACKAGED):
        if claim_files(folder):
            return folder
    raise ExperimentError(f"the lecture's claims are neither in a checkout ({EXPERIMENTS}) nor in the installed "
                          f"package ({PACKAGED}): reinstall lecture3, or pass --claims DIR for claims of your own")


def _is_lecture(path: Path) -> bool:
    return path.resolve().parent in (EXPERIMENTS.resolve(), PACKAGED.resolve())


def _stem_matches(stem: str, wanted: str) -> bool:
    """`c01` names c01_pre_vs_post_norm; any other name is the whole file name."""
    return stem == wanted or (re.fullmatch(r"c\d\d", wanted) is not None and stem.startswith(wanted + "_"))


def find_claim(name: str, folder: Path | None = None) -> Path:
    """The claim file `name` names: a path to a .py file, or a name (c01, 1, c01_pre_vs_post_norm, tied)
    looked up in `folder` first, then among the lecture's claims."""
    wanted = name.strip()
    if wanted.endswith(".py") or os.sep in wanted or "/" in wanted:
        path = Path(wanted).expanduser()
        if folder is not None and not path.is_absolute() and (Path(folder) / path).is_file():
            path = Path(folder) / path
        if not path.is_file():
            raise ExperimentError(f"no claim file {wanted}: pass an existing .py file, or a claim's name")
        return path.resolve()
    if wanted.isdigit():
        wanted = f"c{int(wanted):02d}"
    folders = [Path(folder)] if folder is not None else []
    try:
        folders.append(lecture_dir())
    except ExperimentError:
        if not folders:
            raise
    known = []
    for where in folders:
        files = claim_files(where)
        match = [p for p in files if _stem_matches(p.stem, wanted)]
        if len(match) == 1:
            return match[0].resolve()
        known += [p.stem for p in files]
    where = " or ".join(str(f) for f in folders)
    raise ExperimentError(f"unknown claim {name!r}: expected one of {', '.join(known) or 'none'} (in {where}; the "
                          "lecture's also by number), or 'all'; a claim elsewhere: --claims DIR, or its file's path")


def load(name: str, folder: Path | None = None) -> Claim:
    """The claim of `name` (see `find_claim`): `c01`, `1`, `c01_pre_vs_post_norm`, `tied`, `path/to/tied.py`."""
    return load_file(find_claim(name, folder))


def load_file(path: Path) -> Claim:
    """The `CLAIM` of a claim file, its module imported once per file."""
    path = Path(path).resolve()
    # the checkout's claims keep the module name they always had; any other file gets one of its own path
    checkout = path.parent == EXPERIMENTS.resolve()
    suffix = "" if checkout else "_" + hashlib.sha256(str(path).encode()).hexdigest()[:8]
    mod_name = f"lecture3_experiments.{path.stem}{suffix}"
    if mod_name in sys.modules:
        return sys.modules[mod_name].CLAIM
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
    claim = getattr(module, "CLAIM", None)
    if not isinstance(claim, Claim):
        del sys.modules[mod_name]
        raise ExperimentError(f"{path} defines no CLAIM = Claim(...)")
    if claim.name != path.stem:
        del sys.modules[mod_name]
        raise ExperimentError(f"{path} declares Claim(name={claim.name!r}): name it {path.stem!r}, as its file "
                              "(or name=Path(__file__).stem)")
    claim.__dict__.setdefault("module", module)
    claim.__dict__.setdefault("path", path)
    return claim


def source_path(claim: Claim) -> Path | None:
    """The file a claim was loaded from (None for a Claim built in code, e.g. a test's)."""
    return claim.__dict__.get("path")


def default_root(claim: Claim, quick: bool = False) -> Path:
    """Where a claim's records and reports go unless `--results` says: the lecture's in the checkout's
    experiments/results(-quick)/; a claim of your own beside its file, DIR/results(-quick)/; the lecture's
    claims of an installed package (no checkout) in ./results(-quick)/ of the current folder."""
    path = source_path(claim)
    name = "results-quick" if quick else "results"
    if path is None or path.parent == EXPERIMENTS.resolve():
        return QUICK_RESULTS if quick else RESULTS
    if path.parent == PACKAGED.resolve():
        return Path.cwd().resolve() / name
    return path.parent / name


def base(claim: Claim, quick: bool, root: Path | None) -> Path:
    """The results root of a claim: `root` if given, else its default."""
    return Path(root).resolve() if root is not None else default_root(claim, quick)


def module_of(claim: Claim):
    return claim.__dict__.get("module") or sys.modules[f"lecture3_experiments.{claim.name}"]


def grid(claim: Claim, scale: str = "cpu", quick: bool = False, root: Path | None = None) -> list[RunSpec]:
    """The claim's runs as its grid stands now (a grid run at "the baseline's best LR" reads the pool of
    `root`); in quick mode the first configuration of each (measure, arm) at its first `QUICK_SEEDS`
    seeds, each config shrunk (protocol.quick)."""
    with protocol.building(pool_dir(quick, base(claim, quick, root)), quick):
        specs = claim.runs(scale)
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise ExperimentError(f"{claim.name}: two runs of the grid have the same config and measure")
    if not quick:
        return specs
    seeds = sorted({s.tags.get("seed", 0) for s in specs})[:QUICK_SEEDS]
    first: dict[tuple, dict] = {}  # (measure, arm) -> the tags (without the seed) of its first configuration
    kept = []
    for s in specs:
        tags = {k: v for k, v in s.tags.items() if k != "seed"}
        if first.setdefault((s.measure, str(s.tags.get("arm"))), tags) != tags or s.tags.get("seed", 0) not in seeds:
            continue
        kept.append(dataclasses.replace(s, config=protocol.quick(s.config), args={**s.args, "quick": True}))
    return kept


def results_dir(claim: Claim, scale: str, quick: bool, root: Path | None = None) -> Path:
    """The folder of the claim's report and plots."""
    return base(claim, quick, root) / (claim.name if scale == "cpu" else f"{claim.name}-{scale}")


def pool_dir(quick: bool = False, root: Path | None = None) -> Path:
    """The pool of run records every claim shares (`root` None: the lecture's; a claim's: `claim_pool`)."""
    return (Path(root) if root is not None else (QUICK_RESULTS if quick else RESULTS)) / protocol.POOL


def pooled(pool: Path, specs: Iterable[RunSpec]) -> dict[str, dict]:
    """The records of `specs` that the pool holds, by key."""
    out = {}
    for spec in specs:
        path = pool / f"{spec.key}.json"
        if path.is_file():
            try:
                out[spec.key] = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise records.RecordError(f"{path} is not a valid run record ({e}); delete it and rerun the "
                                          "claim to redo that run") from None
    return out


def claim_pool(claim: Claim, quick: bool = False, root: Path | None = None) -> Path:
    """The pool the claim's records go to: `root`/runs, else its default root's."""
    return pool_dir(quick, base(claim, quick, root))


def claim_results(claim: Claim, scale: str = "cpu", quick: bool = False, root: Path | None = None) -> Results:
    """The claim's grid with the records the pool holds for it (runs nothing)."""
    specs = grid(claim, scale, quick, root)
    return Results(specs, pooled(claim_pool(claim, quick, root), specs))


def baseline_data(claim: Claim, specs: list[RunSpec]):
    """(data config, batch size) of the claim's baseline arm (else its first training run): the rows the
    report's references are scored on."""
    train = [s for s in specs if s.measure == "train"]
    base = [s for s in train if tags_match(s.tags, claim.baseline)]
    if not (base or train):
        cfg = protocol.config(protocol.model_s(), lr=protocol.LRS[0], seed=protocol.SEEDS[0])
        return cfg.data, cfg.train.batch_size
    spec = (base or train)[0]
    return spec.config.data, spec.config.train.batch_size


def claim_references(claim: Claim, specs: list[RunSpec]) -> dict:
    """The references (count bigram, unigram entropy) on the validation rows of the claim's baseline."""
    from lecture3.experiment import references

    data, batch = baseline_data(claim, specs)
    return references.references(data, batch)


def run_args(claim: Claim, spec: RunSpec, scale: str, quick: bool, root: Path | None) -> list[str]:
    """`experiment NAME --run KEY ...`: the arguments of `lecture3` that run this one spec of the grid, from
    any folder: a claim outside the lecture's names its folder (--claims), a results root other than the
    claim's default (or one that depends on the current folder) is named too (--results), absolute."""
    parts = ["experiment", claim.name, "--run", spec.key, "--scale", scale]
    if quick:
        parts.append("--quick")
    parts += claims_args(claim)
    path = source_path(claim)
    follows_cwd = path is not None and path.parent == PACKAGED.resolve()
    if follows_cwd or (root is not None and Path(root).resolve() != default_root(claim, quick).resolve()):
        parts += ["--results", str(base(claim, quick, root))]
    return parts


def claims_args(claim: Claim) -> list[str]:
    """`--claims DIR` (absolute) for a claim outside the lecture's folder, else nothing."""
    path = source_path(claim)
    return ["--claims", str(path.parent)] if path is not None and not _is_lecture(path) else []


def command(claim: Claim, spec: RunSpec, scale: str, quick: bool, root: Path | None) -> str:
    return shlex.join(["lecture3", *run_args(claim, spec, scale, quick, root)]) + " --check"


def execute(claim: Claim, spec: RunSpec) -> dict:
    """The result of one run, in this process."""
    from lecture3.experiment.runs import train_run

    if spec.measure == "train":
        return train_run(spec.config, spec.args)
    fn = getattr(module_of(claim), spec.measure, None)
    if fn is None:
        raise ExperimentError(f"{claim.name} has no measure function {spec.measure!r}")
    return fn(spec.config, **spec.args)


def record_of(claim: Claim, spec: RunSpec, result: dict, wall: float, scale: str, quick: bool,
              root: Path | None, prov: dict) -> dict:
    """The record of one finished run; `prov` (`provenance`) says what produced it."""
    return {
        "key": spec.key, "claim": claim.name, "tags": spec.tags, "measure": spec.measure, "args": spec.args,
        "scale": scale, "quick": quick, "config": spec.config.to_dict(), **prov, "machine": records.machine(),
        "environment": records.environment(spec.config), "command": command(claim, spec, scale, quick, root),
        "wall_s": wall, "finished": records.now(), "result": result,
    }


def _check_clean(quick: bool, root: Path | None, allow_dirty: bool, claim: Claim | None = None) -> list[str]:
    """The code files not committed: lecture3's (in a checkout) and those of the claim's folder (a git work
    tree). Records of a claim's own results root must come from committed code unless `allow_dirty`."""
    dirty = records.uncommitted() if records.is_checkout() else []
    path = None if claim is None else source_path(claim)
    if path is not None and not _is_lecture(path):
        state = records.git_state(path.parent)
        dirty += [f for f in (state or {}).get("uncommitted", []) if f not in dirty]
    own_root = root is None or (claim is not None and Path(root).resolve() == default_root(claim, quick).resolve())
    if dirty and not quick and own_root and not allow_dirty:
        raise ExperimentError(f"uncommitted code ({', '.join(dirty[:4])}{' ...' if len(dirty) > 4 else ''}): "
                              "records must come from committed code; commit first (or pass --allow-dirty, "
                              "which the record then says)")
    return dirty


def provenance(claim: Claim, quick: bool, root: Path | None, allow_dirty: bool) -> dict:
    """What a record says produced it: lecture3's commit (`commit`) and version (`lecture3`), the code files
    not committed (`uncommitted`, refused unless `allow_dirty`), and the claim file (`claim_file`: path,
    sha256, git state of its folder)."""
    dirty = _check_clean(quick, root, allow_dirty, claim)
    source = records.lecture3_source()
    path = source_path(claim)
    claim_file = None if path is None else records.claim_source(path, in_package=path.parent == PACKAGED.resolve())
    return {"commit": source["commit"], "uncommitted": dirty, "allow_dirty": allow_dirty, "lecture3": source,
            "claim_file": claim_file}


def _prepare_data(specs: list[RunSpec]) -> None:
    """Build each data config's tokenizer and validation set once, before workers share the cache."""
    from lecture3 import data as dataio

    seen = set()
    for s in specs:
        d = s.config.data
        if d in seen:
            continue
        seen.add(d)
        dataio.load_tokenizer(d)
        dataio.validation_batches(d, s.config.train.batch_size)


def run_one(claim: Claim, spec: RunSpec, scale: str, quick: bool, root: Path | None, prov: dict) -> dict:
    """Run `spec` in this process and write its record into the pool."""
    t0 = time.perf_counter()
    result = execute(claim, spec)
    rec = record_of(claim, spec, result, time.perf_counter() - t0, scale, quick, root, prov)
    records.write(claim_pool(claim, quick, root), rec)
    return rec


PIN_ENV = "LECTURE3_PIN_CORE"  # a worker pins itself to this core before jax starts (no fork of a jax process)
WORKER_ENV = "LECTURE3_EXPERIMENT_WORKER"  # set in a worker's environment: it runs one spec for a runner


def pin_from_env() -> None:
    core = os.environ.get(PIN_ENV)
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(core)})


PINNED_XLA_FLAG = "--xla_cpu_multi_thread_eigen=false"


def _worker_env(core: int | None, environ=None) -> dict:
    """A pinned worker runs XLA's CPU kernels on its one core without Eigen's thread pool (a pool of
    threads sharing one core only switches between them)."""
    env = {**(os.environ if environ is None else environ), WORKER_ENV: "1"}
    if core is not None:
        env[PIN_ENV] = str(core)
        if PINNED_XLA_FLAG not in env.get("XLA_FLAGS", ""):
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + PINNED_XLA_FLAG).strip()
    return env


def become_worker() -> None:
    """`lecture3 experiment NAME --run KEY` typed in a shell runs as a grid's worker does, so the record's
    command reruns it in the same numerical environment: pinned to the first core it may use, with the
    worker's XLA flag. Only on a CPU host and before jax starts; a worker the runner started already is."""
    if WORKER_ENV in os.environ or not hasattr(os, "sched_getaffinity") or not runtime.runs_on_cpu(os.environ) \
            or runtime.backend_started():
        return
    os.environ.update(_worker_env(min(os.sched_getaffinity(0))))


def default_jobs() -> int:
    """Worker processes: on a CPU host one per core, pinned (measured fastest here: two pinned processes
    gave 1.15-1.2x one two-thread process); on an accelerator one process."""
    import jax

    if jax.devices()[0].platform != "cpu":
        return 1
    return max(1, runtime.cpu_cores())


ENGINES = ("auto", "processes", "population", "inline")


def default_engine(jobs: int) -> str:
    """What measured fastest: on a CPU host worker processes pinned one per core (vmapping members gave no
    gain there, benchmarks/population.py); on an accelerator one population program per architecture."""
    import jax

    if jax.devices()[0].platform != "cpu":
        return "population"
    return "processes" if jobs > 1 else "inline"


def program_key(spec: RunSpec) -> str:
    """Runs with the same program key differ only in a population's member keys (seed, LR, ...)."""
    from lecture3.population import MEMBER_KEYS

    canon = {"train.seed": 0, "data.seed": 0, "train.lr": 1e-3, "train.final_lr": 1e-4, "train.warmup_steps": 0,
             "train.weight_decay": None, "train.z_loss": None}
    assert set(canon) == set(MEMBER_KEYS)
    cfg = spec.config.replace(**canon)
    return json.dumps([cfg.to_dict(), spec.args], sort_keys=True, default=str)


def _run_populations(claim, specs, scale, quick, root, prov, echo) -> None:
    from lecture3.experiment.runs import population_runs

    groups: dict[str, list[RunSpec]] = {}
    for s in specs:
        groups.setdefault(program_key(s), []).append(s)
    for i, group in enumerate(groups.values(), 1):
        t0 = time.perf_counter()
        results = population_runs([s.config for s in group], group[0].args)
        wall = (time.perf_counter() - t0) / len(group)
        for spec, result in zip(group, results, strict=True):
            rec = record_of(claim, spec, result, wall, scale, quick, root, prov)
            records.write(claim_pool(claim, quick, root), rec)
        echo(f"  [population {i}/{len(groups)}] {len(group)} members ({group[0].label} ...) "
             f"{time.perf_counter() - t0:.0f} s")


def run_claim(claim: Claim, *, scale: str = "cpu", quick: bool = False, jobs: int | None = None,
              root: Path | None = None, allow_dirty: bool = False, echo: Callable = print,
              engine: str = "auto") -> Results:
    """Run every missing run of the claim's grid (building the grid again after each pass, until it stops
    growing), then write its report; returns the results."""
    if engine not in ENGINES:
        raise ExperimentError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    pool = claim_pool(claim, quick, root)
    prov = provenance(claim, quick, root, allow_dirty)
    jobs = default_jobs() if jobs is None else jobs
    engine = default_engine(jobs) if engine == "auto" else engine
    attempted: set[str] = set()
    while True:
        specs = grid(claim, scale, quick, root)
        done = pooled(pool, specs)
        todo = [s for s in specs if s.key not in done]
        echo(f"{claim.name}: {len(specs) - len(todo)}/{len(specs)} runs done; {len(todo)} to run "
             f"(records in {pool})")
        if not todo:
            break
        again = [s for s in todo if s.key in attempted]
        if again:
            raise ExperimentError(f"{claim.name}: the run {again[0].label} ({again[0].key}) finished but its record "
                                  f"is not in {pool}: check that the folder is writable and rerun")
        attempted.update(s.key for s in todo)
        _run_pass(claim, todo, engine, jobs, scale, quick, root, allow_dirty, prov, echo)
    results = Results(specs, done)
    from lecture3.experiment import report

    refs = claim_references(claim, specs)
    path = report.write(claim, results, results_dir(claim, scale, quick, root), refs, scale=scale, quick=quick)
    echo(f"{claim.name}: {report.verdict_line(claim, results, refs, quick)}; wrote {path}")
    return results


def _run_pass(claim, todo, engine, jobs, scale, quick, root, allow_dirty, prov, echo) -> None:
    """Run `todo` with `engine`: timing measurements (`exclusive`) alone, in this process, after the rest."""
    _prepare_data(todo)
    shared = [s for s in todo if not s.exclusive]
    alone = [s for s in todo if s.exclusive]
    if engine == "population":
        _run_populations(claim, [s for s in shared if s.measure == "train"], scale, quick, root, prov, echo)
        alone = [s for s in shared if s.measure != "train"] + alone
    elif engine == "processes" and len(shared) > 1:
        _run_workers(claim, shared, max(jobs, 1), scale, quick, root, allow_dirty, echo)
    else:
        alone = shared + alone
    for i, spec in enumerate(alone, 1):
        t0 = time.perf_counter()
        run_one(claim, spec, scale, quick, root, prov)
        echo(f"  [{i}/{len(alone)}] {spec.label} ({spec.measure}) {time.perf_counter() - t0:.0f} s")


def _run_workers(claim, specs, jobs, scale, quick, root, allow_dirty, echo) -> None:
    """Each spec in its own `lecture3 experiment NAME --run KEY` process, `jobs` at a time, one per core."""
    commands = [(f"{s.label} ({s.measure})", [sys.executable, "-m", "lecture3", *run_args(claim, s, scale, quick, root),
                                              *(["--allow-dirty"] if allow_dirty else [])]) for s in specs]
    failures = run_processes(commands, jobs, echo)
    if failures:
        raise ExperimentError(f"{len(failures)} run(s) of {claim.name} failed (output above); the finished runs "
                              "are recorded: fix the cause and rerun to do the rest")


def run_processes(commands: list[tuple[str, list[str]]], jobs: int, echo: Callable = print) -> list[tuple[str, str]]:
    """Run each (label, argv) in its own process, `jobs` at a time, each pinned to a core of its own.
    A worker's output goes to a temporary file, never to a pipe left unread while it runs (a pipe holds
    64 KiB: a worker that prints more would block forever). Returns (label, output) of each that failed."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    free = list(cores[:jobs]) if len(cores) >= jobs else [None] * jobs
    pending = list(commands)
    running: dict[subprocess.Popen, tuple] = {}
    failures = []
    n = 0
    try:
        while pending or running:
            while pending and free:
                (label, argv), core = pending.pop(0), free.pop(0)
                out = tempfile.TemporaryFile("w+")
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_worker_env(core), text=True)
                running[proc] = (label, core, out, time.perf_counter())
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                label, core, out, t0 = running.pop(proc)
                free.append(core)
                n += 1
                out.seek(0)
                text = out.read()
                out.close()
                if proc.returncode != 0:
                    failures.append((label, text))
                    echo(f"  [{n}/{len(commands)}] {label}: FAILED (rc {proc.returncode})\n{text[-2000:]}")
                else:
                    echo(f"  [{n}/{len(commands)}] {label} {time.perf_counter() - t0:.0f} s"
                         f"{'' if core is None else f' on core {core}'}")
    finally:  # interrupted: no worker outlives the runner
        for proc, (_, _, out, _) in running.items():
            proc.kill()
            proc.wait()
            out.close()
    return failures


def find(claim: Claim, key: str, scale: str, quick: bool, root: Path | None = None) -> RunSpec:
    for s in grid(claim, scale, quick, root):
        if s.key == key:
            return s
    listing = shlex.join(["lecture3", "experiment", claim.name, *claims_args(claim), "--list-runs"])
    raise ExperimentError(f"no run {key!r} in {claim.name}'s {'quick ' if quick else ''}{scale} grid: "
                          f"`{listing}` lists them")


NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def new(name: str, folder: Path) -> Path:
    """Write `folder/NAME.py`: the commented template of a claim (`TEMPLATE`), runnable as it is."""
    if not NAME.fullmatch(name) or name in ("all", "new"):
        raise ExperimentError(f"{name!r} cannot name a claim: use letters, digits and _ (a file name without .py, "
                              "e.g. tied_embeddings), not 'all' or 'new'")
    path = Path(folder) / f"{name}.py"
    if path.exists():
        raise ExperimentError(f"{path} exists: pick another name, or delete it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TEMPLATE.read_text())
    return path
