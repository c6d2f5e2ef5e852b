"""What a claim declares: its runs (configs x LRs x seeds), what each run measures, and its criteria.

A claim module (the lecture's in `experiments/`, yours in any folder: `lecture3 experiment new NAME`) defines

    CLAIM = Claim(number=1, name="c01_pre_vs_post_norm", title=..., lecture=..., references=...,
                  runs=runs, criteria=criteria, plots=plots)

with `name` its file's name (without .py); `number` is the lecture's (1 ... 15), left out by a claim of your own.

`runs(scale)` returns the `RunSpec`s of the grid, `criteria(results)` the `Criterion`s judged on the
finished records, `plots(results, folder)` the figures of the report. A run is keyed by a hash of
what determines its numbers (the full config, the measure and its arguments, `RECORD_VERSION`), so a
rerun of the grid skips finished runs and a changed run is a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from lecture3.config import Config
from lecture3.experiment import stats
from lecture3.experiment.key_fields import KEY_FIELDS

RECORD_VERSION = 2  # bump when a change to the harness changes what a record holds or means (2: protocol v2,
# its data pipeline: rows drawn from the whole training split, the whole validation split)


def _default(f: dataclasses.Field):
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def added_fields(config: Config) -> dict[tuple[str, str], Any]:
    """The fields of `config`'s sections added since the keys were defined (`key_fields.KEY_FIELDS`), each with
    its default: at that value a field is left out of the key."""
    return {(section, f.name): _default(f) for section in KEY_FIELDS
            for f in dataclasses.fields(getattr(config, section)) if f.name not in KEY_FIELDS[section]}


def key_config(config: Config) -> dict:
    """The config as the key sees it: `to_dict()` without the fields added since the keys were defined, while
    they hold their defaults (the maths of every earlier record)."""
    d = config.to_dict()
    for (section, name), value in added_fields(config).items():
        if d[section].get(name, value) == value:
            d[section].pop(name, None)
    return d


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a grid: a config, labels for the report, and what to measure.

    measure: "train" trains `config` and evaluates it (the default); any other name is a function of the
        claim module, `fn(config, **args) -> dict`, for measurements without training (gradient norms at
        init, step time A/B, decode speed). `args` must be JSON (it is part of the key).
    tags: labels that place the run in the claim's tables (`arm`, `lr`, `seed`, ...); not in the key.
    exclusive: a timing measurement, run alone on the machine (never beside another job).
    """

    config: Config
    tags: dict
    measure: str = "train"
    args: dict = dataclasses.field(default_factory=dict)
    exclusive: bool = False

    @property
    def key(self) -> str:
        blob = json.dumps({"config": key_config(self.config), "measure": self.measure, "args": self.args,
                           "version": RECORD_VERSION}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.tags.items())


@dataclasses.dataclass(frozen=True)
class Criterion:
    """One pre-registered criterion, judged: `outcome` is "pass", "fail" or "inconclusive" (protocol v2),
    None when the runs it needs are missing. `comparisons` are the paired comparisons behind it, each
    labelled, for the report and the suite's summary plot."""

    name: str  # "(a)"
    text: str  # the criterion in words, with its numbers
    outcome: str | None
    detail: str  # the measured numbers behind the decision
    comparisons: tuple = ()  # (label, stats.Paired) pairs


@dataclasses.dataclass(frozen=True)
class Claim:
    name: str  # the claim file's name without .py, e.g. c01_pre_vs_post_norm
    title: str
    lecture: str  # what the lecture says, in the project's words
    references: str  # the reference numbers from the literature
    runs: Callable[[str], list[RunSpec]]  # scale -> the grid
    criteria: Callable[[Results], list[Criterion]]
    plots: Callable[[Results, Any], list[tuple[str, str]]] = lambda results, folder: []
    setup: str = ""  # the choices the protocol left open, as made by this claim
    observations: Callable[[Results], list[str]] = lambda results: []
    key_number: Callable[[Results], str] = lambda results: ""
    # the tags of the claim's baseline arm (protocol v2: at its best LR it must end below the count bigram,
    # or the claim is inconclusive, under-trained); a tag `lr` absent here means "at the arm's best LR"
    baseline: dict = dataclasses.field(default_factory=dict)
    number: int | None = dataclasses.field(default=None, kw_only=True)  # the lecture's claims: 1 ... 15

    @property
    def short(self) -> str:
        """c04 for the lecture's claim 4; a claim of your own (no number) is its name."""
        return self.name if self.number is None else f"c{self.number:02d}"

    @property
    def heading(self) -> str:
        """How a report names the claim: "Claim 4", or "Claim tied" for a claim of your own."""
        return f"Claim {self.name if self.number is None else self.number}"


class Results:
    """The finished records of a claim, queried by tags: `results.values("val_loss", arm="post", lr=1e-3)`."""

    def __init__(self, specs: Sequence[RunSpec], records: dict[str, dict]):
        self.specs = list(specs)
        self.records = records
        self.rows = [(s, records[s.key]) for s in self.specs if s.key in records]

    @property
    def complete(self) -> bool:
        return len(self.rows) == len(self.specs)

    def select(self, measure: str = "train", **tags) -> list[tuple[RunSpec, dict]]:
        return [(s, r) for s, r in self.rows
                if s.measure == measure and all(_same(s.tags.get(k), v) for k, v in tags.items())]

    def measured(self, measure: str, **tags) -> dict | None:
        """The result of the (first) run of a measure function matching `tags`, None while it is missing."""
        rows = self.select(measure, **tags)
        return rows[0][1]["result"] if rows else None

    def expected(self, measure: str = "train", **tags) -> int:
        return sum(1 for s in self.specs
                   if s.measure == measure and all(_same(s.tags.get(k), v) for k, v in tags.items()))

    def values(self, key: str = "final_loss", measure: str = "train", **tags) -> list[float]:
        """One value per matching run (per seed), in seed order. `final_loss` is the final validation loss
        with a diverged run counted as its initial loss (ln V): diverged runs are never dropped."""
        rows = sorted(self.select(measure, **tags), key=lambda sr: sr[0].tags.get("seed", 0))
        return [r["result"][key] for _, r in rows]

    def full(self, measure: str = "train", **tags) -> bool:
        """Every run matching the tags has a record."""
        n = self.expected(measure, **tags)
        return n > 0 and len(self.select(measure, **tags)) == n

    def tag_values(self, tag: str, measure: str = "train", **tags) -> list:
        seen = []
        for s in self.specs:
            if s.measure == measure and all(_same(s.tags.get(k), v) for k, v in tags.items()):
                v = s.tags.get(tag)
                if v is not None and v not in seen:
                    seen.append(v)
        return seen

    def by_seed(self, key: str = "final_loss", measure: str = "train", **tags) -> dict[int, float]:
        """seed -> value of `key` for the runs matching `tags` (one run per seed): what a paired
        comparison takes."""
        out = {}
        for s, r in self.select(measure, **tags):
            seed = s.tags.get("seed", 0)
            if seed in out:
                raise ValueError(f"two runs with seed {seed} match {tags}: name more tags")
            out[seed] = r["result"][key]
        return dict(sorted(out.items()))

    def by_lr(self, key: str = "final_loss", **tags) -> dict[float, list[float]]:
        return {lr: self.values(key, lr=lr, **tags) for lr in self.tag_values("lr", **tags)}

    def per_seed_by_lr(self, key: str = "final_loss", **tags) -> dict[int, dict[float, float]]:
        out: dict[int, dict[float, float]] = {}
        for s, r in self.select(**tags):
            out.setdefault(s.tags.get("seed", 0), {})[s.tags["lr"]] = r["result"][key]
        return out

    def best_lr(self, **tags) -> float | None:
        table = self.by_lr(**tags)
        if not table or any(len(v) != self.expected(lr=lr, **tags) or not v for lr, v in table.items()):
            return None
        return stats.best_lr(table)

    def sensitivity_per_seed(self, **tags) -> dict[int, float]:
        """LR sensitivity of each seed over the LR grid of the runs matching `tags` (a diverged run's
        `final_loss` is already its initial loss L0)."""
        init = self.initial_loss(**tags)
        return {seed: stats.lr_sensitivity(row, init) for seed, row in sorted(self.per_seed_by_lr(**tags).items())}

    def initial_loss(self, **tags) -> float:
        rows = self.select(**tags)
        return rows[0][1]["result"]["initial_loss"] if rows else math.nan


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return a == b


def tags_match(tags: dict, wanted: dict) -> bool:
    """`tags` hold every tag of `wanted` (floats compared to a relative 1e-9: 3e-3 is 0.003)."""
    return all(_same(tags.get(k), v) for k, v in wanted.items())


def need(results: Results, **tags) -> bool:
    """All the runs matching `tags` are done (a criterion that needs them can be judged)."""
    return results.full(**tags)
