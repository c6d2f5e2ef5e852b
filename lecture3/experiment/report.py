"""A claim's `report.md` (setup actually run, a table of every configuration, each criterion with its
numbers, the verdict as the last line) and the plot helpers the claims draw their figures with."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from lecture3.experiment import stats
from lecture3.experiment.spec import Claim, Results


def judged(claim: Claim, results: Results) -> list:
    return claim.criteria(results)


def verdict_of(claim: Claim, results: Results, quick: bool = False) -> str:
    if quick:
        return "none (quick mode: a smoke run of the code path, not evidence)"
    if not results.complete:
        return f"incomplete ({len(results.rows)}/{len(results.specs)} runs done)"
    return stats.verdict([c.passed for c in judged(claim, results)])


def verdict_line(claim: Claim, results: Results, quick: bool = False) -> str:
    return f"Verdict: {verdict_of(claim, results, quick)}"


def _arm(tags: dict) -> tuple:
    return tuple((k, v) for k, v in tags.items() if k != "seed")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def config_table(results: Results) -> list[str]:
    """One row per configuration (tags without the seed): runs, diverged, final validation loss."""
    groups: dict[tuple, list] = {}
    for spec in results.specs:
        if spec.measure == "train":
            groups.setdefault(_arm(spec.tags), [])
    for spec, rec in results.rows:
        if spec.measure == "train":
            groups[_arm(spec.tags)].append(rec["result"])
    if not groups:
        return []
    cols = list(dict.fromkeys(k for arm in groups for k, _ in arm))
    lines = ["| " + " | ".join(cols) + " | runs | diverged | final val loss (mean ± std) | max attn logit | "
             "mean abs log Z |", "|" + "---|" * (len(cols) + 5)]
    for arm, res in groups.items():
        d = dict(arm)
        n_exp = results.expected(**d)
        losses = [r["final_loss"] for r in res]
        div = sum(r["diverged"] for r in res)
        logit = [r["probe"]["max_attn_logit"] for r in res if r.get("probe")]
        logz = [r["probe"]["log_z_abs"] for r in res if r.get("probe")]
        lines.append("| " + " | ".join(_fmt(d.get(c, "")) for c in cols) +
                     f" | {len(res)}/{n_exp} | {div} | {stats.fmt_mean_std(losses)} | "
                     f"{stats.fmt_mean_std(logit) if logit else '–'} | {stats.fmt_mean_std(logz) if logz else '–'} |")
    return lines


def measure_table(results: Results) -> list[str]:
    """Scalar results of the measure runs (no training), one row per run."""
    rows = [(s, r) for s, r in results.rows if s.measure != "train"]
    if not rows:
        return []
    lines = []
    for spec, rec in rows:
        scalars = {k: v for k, v in rec["result"].items() if isinstance(v, int | float) and not isinstance(v, bool)}
        shown = ", ".join(f"{k} = {v:.4g}" for k, v in list(scalars.items())[:12])
        lines.append(f"- `{spec.measure}` {spec.label}: {shown}")
    return lines


def setup_lines(claim: Claim, results: Results, scale: str, quick: bool) -> list[str]:
    train = [(s, r) for s, r in results.rows if s.measure == "train"]
    steps = sorted({s.config.train.steps for s, _ in train})
    tokens = sorted({r["result"]["tokens"] for _, r in train})
    seeds = sorted({s.tags.get("seed") for s in results.specs if "seed" in s.tags})
    machines = sorted({f"{r['machine']['cpu']} ({r['machine']['platform']}, {r['machine']['cores']} cores, "
                       f"jax {r['machine']['jax']})" for _, r in results.rows})
    commits = sorted({(r.get("commit") or "?")[:10] for _, r in results.rows})
    wall = sum(r["wall_s"] for _, r in results.rows)
    models = sorted({(s.config.model.d_model, s.config.model.n_layers, s.config.model.n_heads,
                      s.config.data.seq_len, s.config.train.batch_size) for s, _ in train})
    out = [f"- scale: **{scale}**{' (quick mode)' if quick else ''}; "
           f"runs done: {len(results.rows)}/{len(results.specs)}",
           f"- steps per training run: {', '.join(map(str, steps)) or '–'}; tokens per run: "
           f"{', '.join(f'{t:,}' for t in tokens) or '–'}; seeds: {', '.join(map(str, seeds)) or '–'}",
           "- models (d_model, layers, heads, T, batch): " + ", ".join(map(str, models)),
           f"- machine: {'; '.join(machines) or '–'}",
           f"- commits: {', '.join(commits) or '–'}; total wall time of the runs: {wall / 60:.1f} min",
           "- data: " + ", ".join(sorted({f"{s.config.data.source} corpus, tokenizer {s.config.data.tokenizer}, "
                                         f"T {s.config.data.seq_len}, validation {s.config.data.val_sequences} rows"
                                         for s, _ in train})) or "–"]
    return out


def write(claim: Claim, results: Results, folder: Path, *, scale: str = "cpu", quick: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# Claim {claim.number}: {claim.title}", "", claim.lecture.strip(), "", "## References", "",
             claim.references.strip(), "", "## Setup actually run", "", *setup_lines(claim, results, scale, quick)]
    if claim.setup:
        lines += ["", claim.setup.strip()]
    lines += ["", "## Every configuration", "", "Final validation loss in nats/token; a diverged run counts as "
              "its initial loss ln V.", "", *config_table(results)]
    meas = measure_table(results)
    if meas:
        lines += ["", "## Measurements", "", *meas]
    lines += ["", "## Criteria (fixed before any run)", ""]
    for c in judged(claim, results):
        mark = {True: "**pass**", False: "**fail**", None: "not judged (runs missing)"}[c.passed]
        lines.append(f"- {c.name} {c.text}: {mark}. {c.detail}")
    figures = []
    if results.rows:
        try:
            figures = claim.plots(results, folder)
        except ImportError:
            lines += ["", "(plots need matplotlib: pip install 'lecture3[plot]')"]
    if figures:
        lines += ["", "## Plots", ""]
        for name, caption in figures:
            lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    obs = claim.observations(results) if results.rows else []
    if obs:
        lines += ["", "## Observations (no criterion)", "", *[f"- {o}" for o in obs]]
    lines += ["", verdict_line(claim, results, quick)]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, folder: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=80)
    _plt().close(fig)
    return name


def loss_vs_lr(results: Results, folder: Path, name: str, arm: str = "arm", title: str = "",
               key: str = "final_loss", ylabel: str = "final val loss (diverged = ln V)", log_y: bool = False,
               **tags) -> tuple[str, str]:
    """Mean (and each seed) of `key` against the LR, one line per value of the tag `arm`."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for value in results.tag_values(arm, **tags):
        lrs = results.tag_values("lr", **{arm: value, **tags})
        pts = [(lr, v) for lr in lrs for v in _probe_or(results, key, lr=lr, **{arm: value, **tags})]
        means = [(lr, stats.mean(vs)) for lr in lrs if (vs := _probe_or(results, key, lr=lr, **{arm: value, **tags}))]
        if not means:
            continue
        line, = ax.plot(*zip(*means, strict=True), marker="o", label=str(value))
        ax.scatter(*zip(*pts, strict=True), s=8, color=line.get_color(), alpha=0.5)
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, folder, name), title or f"{key} vs LR"


def _probe_or(results: Results, key: str, **tags) -> list[float]:
    """Values of a result key or of a probe key (`probe.max_attn_logit`), finite ones only."""
    out = []
    for _, rec in results.select(**tags):
        res = rec["result"]
        v = res.get("probe", {}).get(key.split(".", 1)[1]) if key.startswith("probe.") else res.get(key)
        if v is not None and math.isfinite(v):
            out.append(v)
    return out


def curves(results: Results, folder: Path, name: str, key: str = "loss", arm: str = "arm", title: str = "",
           log_y: bool = False, **tags) -> tuple[str, str]:
    """`key` over steps (mean over seeds at each logged step), one line per value of `arm`."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for value in results.tag_values(arm, **tags):
        by_step: dict[int, list] = {}
        for _, rec in results.select(**{arm: value, **tags}):
            for r in rec["result"].get("history", []):
                if r.get(key) is not None:
                    by_step.setdefault(r["step"], []).append(r[key])
        if by_step:
            xs = sorted(by_step)
            ax.plot(xs, [stats.mean(by_step[x]) for x in xs], label=str(value))
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, folder, name), title or f"{key} over steps"


def bars(labels: Sequence[str], values: Sequence[Sequence[float]], folder: Path, name: str, ylabel: str,
         title: str = "") -> tuple[str, str]:
    """Mean ± std bars with the per-seed points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(labels) + 1.5), 3.6))
    for i, vs in enumerate(values):
        if vs:
            ax.bar(i, stats.mean(vs), yerr=stats.std(vs), color="C0", alpha=0.6, capsize=3)
            ax.scatter([i] * len(vs), vs, s=8, color="k")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    finite = [v for vs in values for v in vs]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = max((hi - lo) * 0.3, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_title(title, fontsize=9)
    return save(fig, folder, name), title or ylabel


def step_time_bars(timing: dict, folder: Path, name: str = "step_time.png") -> tuple[str, str]:
    """The ms per train step of each arm of a `measures.step_times` result, one bar per arm over its rounds."""
    names = list(timing["rounds_s"])
    return bars(names, [[1e3 * x for x in timing["rounds_s"][n]] for n in names], folder, name,
                "ms per train step", "step time, interleaved rounds")
