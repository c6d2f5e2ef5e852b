"""`lecture3 experiment`: run a claim of the lecture (or all of them) resumably and write its report.

    lecture3 experiment --list                 every claim: runs done / total, verdict
    lecture3 experiment c01                    run what is missing of claim 1, then its report
    lecture3 experiment all --jobs 2           every claim, two worker processes pinned one per core
    lecture3 experiment c04 --quick            the code path in seconds (a smoke run, never a verdict)
    lecture3 experiment c04 --run KEY --check  rerun one recorded run and compare with its record
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None,
                        help="a claim (c01, 1, or c01_pre_vs_post_norm) or 'all'")
    parser.add_argument("--list", action="store_true", help="list the claims with runs done / total and verdict")
    parser.add_argument("--markdown", action="store_true",
                        help="with --list: the README's table (claim, verdict, key number, report, command)")
    parser.add_argument("--update-readme", action="store_true",
                        help="write the --list --markdown table into README.md between its claims-table markers")
    parser.add_argument("--list-runs", action="store_true", help="list the runs of the claim with their keys")
    parser.add_argument("--quick", action="store_true",
                        help="every arm once, tiny and for 3 steps: the code path in seconds, no verdict "
                        "(written under experiments/results-quick/)")
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
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="where records and reports go (default experiments/results/)")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="record although lecture3/ or experiments/ has uncommitted code (the record says so)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the records, run nothing")


def run_experiment(args: argparse.Namespace) -> int:
    from lecture3.experiment import records, report, runner

    runner.pin_from_env()  # a worker of a grid: pinned before anything starts jax
    if args.jobs is not None and args.jobs < 1:
        raise runner.ExperimentError(f"--jobs {args.jobs} is invalid: expected 1 or more")
    if args.check and args.run is None:
        raise runner.ExperimentError("--check needs --run KEY (the run to check)")
    if args.update_readme:
        return _update_readme(args)
    if args.list:
        return _list(args)
    if args.name is None:
        raise runner.ExperimentError("name a claim (c01 ... c15) or 'all', or pass --list")
    if args.results_dir is not None and args.results_dir.exists() and not args.results_dir.is_dir():
        raise runner.ExperimentError(f"--results-dir {args.results_dir} is a file: pass a folder")
    names = [p.stem for p in runner.claim_files()] if args.name == "all" else [args.name]
    if args.run is not None:
        if len(names) != 1:
            raise runner.ExperimentError("--run KEY needs one claim, not 'all'")
        return _one(runner.load(names[0]), args)
    claims = [runner.load(n) for n in names]
    for claim in claims:
        if args.list_runs:
            for spec in runner.grid(claim, args.scale, args.quick):
                print(f"{spec.key}  {spec.measure:<12} {spec.label}")
            continue
        if args.report_only:
            folder = runner.results_dir(claim, args.scale, args.quick, args.results_dir)
            specs = runner.grid(claim, args.scale, args.quick)
            results = runner.Results(specs, records.read_all(folder / "runs"))
            path = report.write(claim, results, folder, scale=args.scale, quick=args.quick)
            print(f"{claim.name}: {report.verdict_line(claim, results, args.quick)}; wrote {path}")
            continue
        runner.run_claim(claim, scale=args.scale, quick=args.quick, jobs=args.jobs, root=args.results_dir,
                         allow_dirty=args.allow_dirty, engine=args.engine)
    return 0


def _one(claim, args) -> int:
    from lecture3.experiment import records, runner

    spec = runner.find(claim, args.run, args.scale, args.quick)
    folder = runner.results_dir(claim, args.scale, args.quick, args.results_dir) / "runs"
    existing = records.read_all(folder).get(spec.key)
    if args.check:
        result = runner.execute(claim, spec)
        print(json.dumps({"key": spec.key, "final_val_loss": result.get("final_val_loss"),
                          "diverged": result.get("diverged")}))
        if existing is None:
            print(f"no record of {spec.key} in {folder} to compare with")
            return 0
        old, new = existing["result"].get("final_val_loss"), result.get("final_val_loss")
        if old is None or new is None:
            same = old == new
            print(f"recorded final_val_loss {old}, now {new}: {'same' if same else 'DIFFERENT'}")
        else:
            diff = abs(old - new)
            same = diff <= 1e-4
            print(f"recorded final_val_loss {old:.6f}, now {new:.6f}: |diff| {diff:.2e} "
                  f"({'within' if same else 'OUTSIDE'} 1e-4; recorded on {existing['machine']['cpu']}, "
                  f"commit {str(existing.get('commit'))[:10]})")
        return 0 if same else 1
    if existing is not None:
        print(f"{spec.key} is already recorded in {folder} (pass --check to rerun and compare)")
        return 0
    dirty = runner._check_clean(args.quick, args.results_dir, args.allow_dirty)
    rec = runner.run_one(claim, spec, folder.parent, args.scale, args.quick, args.results_dir, dirty)
    val = rec["result"].get("final_val_loss")
    print(f"{spec.key} {spec.label}: final_val_loss {val if val is None else f'{val:.6f}'} "
          f"({rec['wall_s']:.0f} s)")
    return 0


def _list(args) -> int:
    if args.markdown:
        print(markdown_table(args.scale, args.results_dir))
        return 0
    from lecture3.experiment import records, report, runner

    for path in runner.claim_files():
        claim = runner.load(path.stem)
        specs = runner.grid(claim, args.scale, args.quick)
        folder = runner.results_dir(claim, args.scale, args.quick, args.results_dir)
        results = runner.Results(specs, records.read_all(folder / "runs"))
        verdict = report.verdict_of(claim, results, args.quick)
        print(f"{claim.short}  {claim.name:<34} {len(results.rows):>4}/{len(specs):<4} {verdict}")
    return 0


def markdown_table(scale: str = "cpu", root: Path | None = None) -> str:
    """The README's table of the claims: claim, verdict, key number, runs, report, the command."""
    from lecture3.experiment import records, report, runner

    rows = ["| # | claim | verdict | key number | runs | report | reproduce |", "|---|---|---|---|---|---|---|"]
    for path in runner.claim_files():
        claim = runner.load(path.stem)
        specs = runner.grid(claim, scale)
        folder = runner.results_dir(claim, scale, False, root)
        results = runner.Results(specs, records.read_all(folder / "runs"))
        rows.append(_markdown_row(claim, results, report.verdict_of(claim, results), folder))
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


def _markdown_row(claim, results, verdict, folder) -> str:
    from lecture3.experiment import records

    key = claim.key_number(results) if results.rows else ""
    try:
        rel = (folder / "report.md").relative_to(records.REPO)
    except ValueError:
        rel = folder / "report.md"
    link = f"[report]({rel})" if (folder / "report.md").exists() else "–"
    return (f"| {claim.number} | {_cell(claim.title)} | {verdict} | {_cell(key) or '–'} "
            f"| {len(results.rows)}/{len(results.specs)} | {link} | `lecture3 experiment {claim.short}` |")


def _cell(text: str) -> str:
    """Text for one markdown table cell: a `|` (as in |log Z|) would end the cell, so it is escaped."""
    return text.replace("|", "\\|")


def command():
    return ("run a claim of the lecture with its pre-registered criteria and write its report",
            add_experiment_args, run_experiment)
