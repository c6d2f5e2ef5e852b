"""The experiments harness: the lecture's claims as grids of runs with pre-registered criteria.

    spec       RunSpec, Claim, Criterion, Results (what a claim module declares and reads)
    protocol   the shared baseline (models S and M, the recipe, seeds, LR grid, scales, quick mode)
    stats      the comparison rule, best LR, divergence, LR sensitivity, verdicts
    runs       one training run and what it measures
    records    one JSON record per finished run
    runner     the resumable grid runner behind `lecture3 experiment`, claims found in any folder
    report     report.md and the plot helpers
    catalogue  `runs_frame(folder)`: every run record under a folder as a pandas DataFrame
"""


def __getattr__(name: str):
    if name == "runs_frame":  # imported on first use: pandas is an extra
        from lecture3.experiment.catalogue import runs_frame

        return runs_frame
    raise AttributeError(f"module 'lecture3.experiment' has no attribute {name!r}")
