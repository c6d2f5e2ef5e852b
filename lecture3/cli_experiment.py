"""`lecture3 experiment`: run a claim of the lecture (or all of them, or one of your own) resumably and
write its report.

    lecture3 experiment --list                 every claim: runs done / total, verdict
    lecture3 experiment c01                    run what is missing of claim 1, then its report
    lecture3 experiment all --jobs 2           every claim (3 and 4 first), two workers pinned one per core
    lecture3 experiment c04 --quick            the code path in seconds (a smoke run, never a verdict)
    lecture3 experiment c04 --run KEY --check  rerun one recorded run and compare with its record
    lecture3 experiment --summary              experiments/results/summary.png: every comparison with its CI
    lecture3 experiment new tied --claims .    ./tied.py: a claim of your own from the commented template
    lecture3 experiment tied --claims .        run it (records and report in ./results/)
    lecture3 experiment --csv [NAME]           every run record (of a claim) as CSV, one row per run

An entry point may set process state (the library does not): this one turns on jax's persistent
compilation cache under the data cache folder, through the environment so the worker processes share it,
and says so.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

MIN_COMPILE_S = 0.2  # programs that compile at least this long are cached (jax's default is 1 s)
SAME_ENVIRONMENT_TOL = 1e-4  # protocol v2: a rerun in the record's environment reproduces the final loss
OTHER_ENVIRONMENT_TOL = 1e-3  # ... in another environment (other rounding), at LR <= OTHER_ENVIRONMENT_MAX_LR
OTHER_ENVIRONMENT_MAX_LR = 3e-3  # above it runs are chaotic: they reproduce only statistically


def add_experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None,
                        help="a claim (c01, 1, or c01_pre_vs_post_norm; a claim of your own by its name or its "
                        "file's path) or 'all'; or 'new' followed by the name of a claim to write")
    parser.add_argument("new_name", nargs="?", default=None, metavar="NAME",
                        help="with 'new': the claim file to write, DIR/NAME.py (DIR from --claims, else .)")
    parser.add_argument("--claims", type=Path, default=None, metavar="DIR",
                        help="a folder of claims of your own, searched before the lecture's; their records and "
                        "reports go to DIR/results/ unless --results says")
    parser.add_argument("--list", action="store_true", help="list the claims with runs done / total and verdict")
    parser.add_argument("--csv", action="store_true",
                        help="print every run record of the results folder (or of the claim NAME) as CSV, one row "
                        "per run (lecture3.experiment.runs_frame; needs pandas)")
    parser.add_argument("--markdown", action="store_true",
                        help="with --list: the README's table (claim, verdict, key comparison, runs, report, "
                        "v1 verdict)")
    parser.add_argument("--update-readme", action="store_true",
                        help="write the --list --markdown table into README.md between its claims-table markers")
    parser.add_argument("--summary", action="store_true",
                        help="write summary.png beside the reports: every claim's comparisons with their 95%% CIs")
    parser.add_argument("--list-runs", action="store_true", help="list the runs of the claim with their keys")
    parser.add_argument("--quick", action="store_true",
                        help="each arm once at two seeds, tiny and for 3 steps: the code path in seconds, no "
                        "verdict (written under experiments/results-quick/, or DIR/results-quick/)")
    parser.add_argument("--scale", choices=("cpu", "gpu"), default="cpu",
                        help="cpu: the protocol as written; gpu: the same grids ~10x the model size")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes, pinned one per core (default: one per core on CPU, 1 on an "
                        "accelerator); 1 runs in this process")
    parser.add_argument("--engine", choices=("auto", "processes", "population", "inline"), default="auto",
                        help="how the training runs of a grid execute: auto (processes pinned one per core on a "
                        "CPU, one population program per architecture on an accelerator), processes, "
                        "population (lecture3.population: members differing in seed/LR/WD/z-loss/warmup as one "
                        "vmapped program), inline (one after another in this process)")
    parser.add_argument("--run", metavar="KEY", default=None, help="one run of the grid, by its record key")
    parser.add_argument("--check", action="store_true",
                        help="with --run: rerun without writing and compare with the recorded result")
    parser.add_argument("--results", "--results-dir", dest="results_dir", type=Path, default=None, metavar="ROOT",
                        help="where reports go, with the records in its runs/ (default: experiments/results/ for the "
                        "lecture's claims in a checkout, DIR/results/ for those of --claims DIR, else ./results/)")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="record although lecture3/, experiments/ or the claim's folder has uncommitted code "
                        "(the record says so)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the records, run nothing")


def compilation_cache() -> str:
    """Turn on jax's persistent compilation cache (an entry point's choice): under the data cache folder
    unless JAX_COMPILATION_CACHE_DIR names one, set in the environment too so the workers inherit it."""
    import jax

    from lecture3.data import DataConfig

    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(DataConfig().cache_dir, "xla-cache")
    min_s = float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", MIN_COMPILE_S))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(min_s)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_s)
    return (f"XLA compilation cache on: {folder} (programs compiling >= {min_s:g} s are reused by later runs and "
            "by the workers)")


def _cache_on() -> None:
    from lecture3.experiment import runner

    line = compilation_cache()
    if runner.WORKER_ENV not in os.environ:  # said once, by the process the user started
        print(line)


def run_experiment(args: argparse.Namespace) -> int:
    from lecture3.experiment import report, runner

    runner.pin_from_env()  # a worker of a grid: pinned before anything starts jax
    if args.jobs is not None and args.jobs < 1:
        raise runner.ExperimentError(f"--jobs {args.jobs} is invalid: expected 1 or more")
    if args.check and args.run is None:
        raise runner.ExperimentError("--check needs --run KEY (the run to check)")
    if args.claims is not None and not args.claims.is_dir() and not (args.name == "new" and not args.claims.exists()):
        raise runner.ExperimentError(f"--claims {args.claims} is not a folder: pass the folder of your claim files")
    if args.name == "new":
        return _new(args)
    if args.new_name is not None:
        raise runner.ExperimentError(f"one claim at a time: {args.name} {args.new_name} (to write a claim: "
                                     f"lecture3 experiment new {args.new_name})")
    if args.results_dir is not None and args.results_dir.exists() and not args.results_dir.is_dir():
        raise runner.ExperimentError(f"--results {args.results_dir} is a file: pass a folder")
    if args.update_readme:
        return _update_readme(args)
    if args.summary:
        return _summary(args)
    if args.list:
        return _list(args)
    if args.csv:
        return _csv(args)
    if args.name is None:
        raise runner.ExperimentError("name a claim (c01 ... c15, or one of your own with --claims DIR) or 'all', "
                                     "or pass --list")
    names = all_names(args.claims) if args.name == "all" else [args.name]
    if args.run is not None:
        if len(names) != 1:
            raise runner.ExperimentError("--run KEY needs one claim, not 'all'")
        return _one(runner.load(names[0], args.claims), args)
    claims = [runner.load(n, args.claims) for n in names]
    if not (args.list_runs or args.report_only):
        _cache_on()
    for claim in claims:
        if args.list_runs:
            for spec in runner.grid(claim, args.scale, args.quick, args.results_dir):
                print(f"{spec.key}  {spec.measure:<12} {spec.label}")
            continue
        if args.report_only:
            results = runner.claim_results(claim, args.scale, args.quick, args.results_dir)
            refs = runner.claim_references(claim, results.specs)
            folder = runner.results_dir(claim, args.scale, args.quick, args.results_dir)
            path = report.write(claim, results, folder, refs, scale=args.scale, quick=args.quick)
            print(f"{claim.name}: {report.verdict_line(claim, results, refs, args.quick)}; wrote {path}")
            continue
        runner.run_claim(claim, scale=args.scale, quick=args.quick, jobs=args.jobs, root=args.results_dir,
                         allow_dirty=args.allow_dirty, engine=args.engine)
    return 0


def _new(args) -> int:
    from lecture3.experiment import runner

    if args.new_name is None:
        raise runner.ExperimentError("name the claim to write: lecture3 experiment new NAME [--claims DIR]")
    folder = args.claims or Path(".")
    path = runner.new(args.new_name, folder)
    flags = f" --claims {_shell(folder)}"
    print(f"wrote {path}: a claim of your own, runnable as it is (tied vs untied embeddings on a tiny model).\n"
          f"  lecture3 experiment {args.new_name}{flags} --quick   # the code path in a minute, no verdict\n"
          f"  lecture3 experiment {args.new_name}{flags}           # the grid, then {folder / 'results'}/"
          f"{args.new_name}/report.md")
    return 0


def _shell(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))


def claim_paths(folder: Path | None = None) -> list[Path]:
    """The claim files `--claims DIR` names (else the lecture's); none is an error that says how to add one."""
    from lecture3.experiment import runner

    files = runner.claim_files(folder)
    if not files:
        raise runner.ExperimentError(f"no claim files in {folder} (a .py file with a CLAIM = Claim(...) line): "
                                     f"`lecture3 experiment new NAME --claims {folder}` writes one")
    return files


def all_names(folder: Path | None = None) -> list[str]:
    """Every claim of `folder` (default: the lecture's), those holding the baseline's LR grid first (the
    others run at its best LR)."""
    from lecture3.experiment import runner

    names = [str(p) for p in claim_paths(folder)] if folder is not None else [p.stem for p in runner.claim_files()]
    return sorted(names, key=lambda n: Path(n).stem.split("_", 1)[0] not in runner.BASELINE_CLAIMS)


def _tol(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")  # 1e-4, 3e-3


def check_rerun(recorded: dict, result: dict, environment: dict, lr: float) -> tuple[list[str], int]:
    """Compare a rerun's final validation loss with its record, at the tolerance protocol v2 holds it to:
    1e-4 in the record's environment; in another one 1e-3 at LR <= 3e-3, and only statistically above.
    Returns the lines to print and the exit status."""
    from lecture3.experiment import records

    old, new = recorded["result"].get("final_val_loss"), result.get("final_val_loss")
    where = f"recorded on {recorded.get('machine', {}).get('cpu', '?')}, commit {str(recorded.get('commit'))[:10]}"
    if old is None or new is None:
        same = old == new
        return [f"recorded final_val_loss {old}, now {new}: {'same' if same else 'DIFFERENT'} ({where})"], int(not same)
    diff = abs(old - new)
    head = f"recorded final_val_loss {old:.6f}, now {new:.6f}: |diff| {diff:.2e}"
    changed = records.environment_differences(recorded.get("environment"), environment)
    if not changed:
        ok = diff <= SAME_ENVIRONMENT_TOL
        verdict = f"{'within' if ok else 'OUTSIDE'} {_tol(SAME_ENVIRONMENT_TOL)}, the same environment"
        return [f"{head} ({verdict}; {where})"], int(not ok)
    lines = ["the numerical environment differs from the record's:", *[f"  {c}" for c in changed],
             f"protocol v2 holds a rerun in another environment to {_tol(OTHER_ENVIRONMENT_TOL)} at LR <= "
             f"{_tol(OTHER_ENVIRONMENT_MAX_LR)}, and above that only statistically (such runs are chaotic)"]
    if lr > OTHER_ENVIRONMENT_MAX_LR:
        verdict = f"LR {lr:g} > {_tol(OTHER_ENVIRONMENT_MAX_LR)}: not held to a tolerance, only statistically"
        return [*lines, f"{head} ({verdict}; {where})"], 0
    ok = diff <= OTHER_ENVIRONMENT_TOL
    verdict = f"{'within' if ok else 'OUTSIDE'} {_tol(OTHER_ENVIRONMENT_TOL)} at LR {lr:g}, another environment"
    return [*lines, f"{head} ({verdict}; {where})"], int(not ok)


def _one(claim, args) -> int:
    from lecture3.experiment import records, runner

    spec = runner.find(claim, args.run, args.scale, args.quick, args.results_dir)
    pool = runner.claim_pool(claim, args.quick, args.results_dir)
    existing = runner.pooled(pool, [spec]).get(spec.key)
    recorded_flags = (existing or {}).get("environment", {}).get("xla_flags", "")
    if existing is None or (args.check and runner.PINNED_XLA_FLAG in recorded_flags):
        runner.become_worker()  # typed in a shell: run as a grid's pinned worker (did)
        runner.pin_from_env()
    if args.check:
        _cache_on()
        result = runner.execute(claim, spec)
        print(json.dumps({"key": spec.key, "final_val_loss": result.get("final_val_loss"),
                          "diverged": result.get("diverged")}))
        if existing is None:
            print(f"no record of {spec.key} in {pool} to compare with")
            return 0
        lines, rc = check_rerun(existing, result, records.environment(spec.config), spec.config.train.lr)
        print("\n".join(lines))
        return rc
    if existing is not None:
        print(f"{spec.key} is already recorded in {pool} (pass --check to rerun and compare)")
        return 0
    prov = runner.provenance(claim, args.quick, args.results_dir, args.allow_dirty)
    _cache_on()
    rec = runner.run_one(claim, spec, args.scale, args.quick, args.results_dir, prov)
    val = rec["result"].get("final_val_loss")
    print(f"{spec.key} {spec.label}: final_val_loss {val if val is None else f'{val:.6f}'} "
          f"({rec['wall_s']:.0f} s)")
    return 0


def _judged(claim, scale: str, quick: bool, root: Path | None):
    """(results, references or None while no verdict is due, verdict) of a claim from the pool."""
    from lecture3.experiment import report, runner

    results = runner.claim_results(claim, scale, quick, root)
    refs = runner.claim_references(claim, results.specs) if results.complete and not quick else None
    return results, refs, report.verdict_of(claim, results, refs, quick)


def _list(args) -> int:
    if args.markdown:
        print(markdown_table(args.scale, args.results_dir))
        return 0
    from lecture3.experiment import runner

    for path in claim_paths(args.claims):
        claim = runner.load_file(path)
        results, _, verdict = _judged(claim, args.scale, args.quick, args.results_dir)
        print(f"{claim.short:<5} {claim.name:<34} {len(results.rows):>4}/{len(results.specs):<4} {verdict}")
    return 0


def _summary(args) -> int:
    from lecture3.experiment import report, runner

    claims = [runner.load_file(p) for p in claim_paths(args.claims)]
    entries = [(claim, runner.claim_results(claim, args.scale, args.quick, args.results_dir)) for claim in claims]
    path = report.summary(entries, runner.base(claims[0], args.quick, args.results_dir) / "summary.png")
    print(f"wrote {path}")
    return 0


def _csv(args) -> int:
    """Every run record under the results root (or those of the claim NAME's grid) as CSV on stdout."""
    import sys

    from lecture3.experiment import catalogue, runner

    if args.name is None:  # the results root of the claims listed (the lecture's, or those of --claims DIR)
        root = runner.base(runner.load_file(claim_paths(args.claims)[0]), args.quick, args.results_dir)
        frame = catalogue.runs_frame(root) if root.is_dir() else None
        where = root
    else:
        claim = runner.load(args.name, args.claims)
        frame = catalogue.claim_frame(claim, args.scale, args.quick, args.results_dir)
        where = f"{runner.claim_pool(claim, args.quick, args.results_dir)} for {claim.name}'s grid"
    if frame is None or frame.empty:
        raise runner.ExperimentError(f"no run records in {where}: run a claim first")
    catalogue.to_csv(frame, sys.stdout)
    return 0


def markdown_table(scale: str = "cpu", root: Path | None = None) -> str:
    """The README's table of the claims: claim, v2 verdict, key comparison, runs, report, v1 verdict."""
    from lecture3.experiment import runner

    rows = ["| # | claim | verdict | key comparison (95% CI) | runs | report | v1 verdict (withdrawn) |",
            "|---|---|---|---|---|---|---|"]
    for path in runner.claim_files():
        claim = runner.load_file(path)
        results, _, verdict = _judged(claim, scale, False, root)
        rows.append(_markdown_row(claim, results, verdict, runner.results_dir(claim, scale, False, root)))
    return "\n".join(rows)


README_MARKERS = ("<!-- claims-table -->", "<!-- /claims-table -->")


def _update_readme(args) -> int:
    from lecture3.experiment import records, runner

    path = records.REPO / "README.md"
    text = path.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        raise runner.ExperimentError(f"{path} has no {start} ... {end} markers to write the table between")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{markdown_table(args.scale, args.results_dir)}\n{end}{tail}")
    print(f"wrote the claims table into {path}")
    return 0


def v1_verdict(claim) -> str:
    """The verdict v1 gave (its report's last "Verdict:" line), kept as history in results-v1/."""
    from lecture3.experiment import runner

    path = runner.V1_RESULTS / claim.name / "report.md"
    if not path.is_file():
        return "–"
    lines = [line for line in path.read_text().splitlines() if line.startswith("Verdict:")]
    return lines[-1].removeprefix("Verdict:").strip() if lines else "–"


def _markdown_row(claim, results, verdict, folder) -> str:
    from lecture3.experiment import records, report

    key = report.key_comparison(report.judged(claim, results)) if results.rows else ""
    try:
        rel = (folder / "report.md").relative_to(records.REPO)
    except ValueError:
        rel = folder / "report.md"
    link = f"[report]({rel})" if (folder / "report.md").exists() else "–"
    number = claim.name if claim.number is None else claim.number
    return (f"| {number} | {_cell(claim.title)} | {verdict} | {_cell(key) or '–'} "
            f"| {len(results.rows)}/{len(results.specs)} | {link} | {_cell(v1_verdict(claim))} |")


def _cell(text: str) -> str:
    """Text for one markdown table cell: a `|` (as in |log Z|) would end the cell, so it is escaped."""
    return text.replace("|", "\\|")


def command():
    return ("run a claim of the lecture with its pre-registered criteria and write its report",
            add_experiment_args, run_experiment)
