"""A claim's `report.md` under protocol v2 and the plot helpers the claims draw their figures with.

A report states the claim, what the literature measured, the setup actually run (tokens per run
included), the references (a count bigram and the unigram entropy on the same validation rows), a table
of every configuration, each criterion with its outcome and its paired comparisons (d, 95% CI, d relative
to mean(B), outcome), and ends with a "Verdict:" line (`stats.verdict`). The bigram floor: the claim's
baseline arm (`Claim.baseline`; at its best LR unless its tags name one) must end below the bigram, else
the verdict is "inconclusive (under-trained)" whatever the criteria say. A quick run judges nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from lecture3.experiment import stats
from lecture3.experiment.spec import Claim, Criterion, Results

QUICK_VERDICT = "none (quick mode: a smoke run of the code path, not evidence)"
UNDER_TRAINED = "inconclusive (under-trained)"
OUTCOME_COLOURS = {"pass": "#2a9d8f", "fail": "#e76f51", "inconclusive": "#e9c46a"}


def judged(claim: Claim, results: Results) -> list[Criterion]:
    return claim.criteria(results)


def _label(tags: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in tags.items())


def baseline_floor(claim: Claim, results: Results, refs: dict) -> tuple[bool | None, str]:
    """Whether the baseline arm (at its best LR unless its tags name one) ends below the count bigram:
    True, False (the claim is under-trained), or None (not judged: no baseline declared, runs missing),
    with the sentence that says so and its numbers."""
    if not claim.baseline:
        return None, "the claim declares no baseline arm (Claim.baseline), so the bigram floor is not checked"
    tags = dict(claim.baseline)
    at = ""
    if "lr" not in tags and results.tag_values("lr", **tags):
        lr = results.best_lr(**tags)
        if lr is None:
            return None, f"the baseline [{_label(tags)}] is not judged against the bigram: runs missing"
        tags["lr"], at = lr, f" at its best LR {lr:g}"
    if not results.full(**tags):
        return None, f"the baseline [{_label(tags)}] is not judged against the bigram: runs missing"
    losses = results.values("final_loss", **tags)
    mean, bigram = stats.mean(losses), refs["bigram_loss"]
    below = mean < bigram
    return below, (f"the baseline [{_label(claim.baseline)}]{at} ends at {mean:.4f} nats/token (mean of {len(losses)} "
                   f"seeds), {'below' if below else 'NOT below'} the count bigram's {bigram:.4f}"
                   + ("" if below else ": the models are under-trained for this test, so the claim is "
                      "inconclusive whatever its criteria say"))


def verdict_of(claim: Claim, results: Results, refs: dict | None, quick: bool = False) -> str:
    """The claim's verdict: none in quick mode, incomplete while runs are missing, "inconclusive
    (under-trained)" when the baseline does not end below the bigram, else `stats.verdict` of its criteria.
    `refs` (`references.references`) may be None only while no verdict is due (quick, incomplete)."""
    if quick:
        return QUICK_VERDICT
    if not results.complete:
        return f"incomplete ({len(results.rows)}/{len(results.specs)} runs done)"
    verdict = stats.verdict([c.outcome for c in judged(claim, results)])
    if verdict == "incomplete":
        return verdict
    if refs is None:
        raise ValueError(f"{claim.name}'s verdict needs the references (the count bigram): pass "
                         "references.references(data config of its baseline)")
    below, _ = baseline_floor(claim, results, refs)
    return UNDER_TRAINED if below is False else verdict


def verdict_line(claim: Claim, results: Results, refs: dict | None, quick: bool = False) -> str:
    return f"Verdict: {verdict_of(claim, results, refs, quick)}"


def key_comparison(criteria: Sequence[Criterion]) -> str:
    """The comparison that decides the verdict, compactly, with its CI: the first judged criterion that did
    not pass (else the first with comparisons), and in it the first comparison that did not pass (else its
    first). A deterministic criterion (no comparisons) shows the first clause of its measured detail
    instead. "" while nothing is judged."""
    judged = [c for c in criteria if c.outcome is not None]
    if not judged:
        return ""
    c = ([c for c in judged if c.outcome != "pass"] or [c for c in judged if c.comparisons] or judged)[0]
    if not c.comparisons:
        return f"{c.name} {c.detail.split(';')[0]}: {c.outcome}"
    p = next((p for _, p in c.comparisons if p.outcome != "pass"), c.comparisons[0][1])
    lo, hi = p.ci
    rel = "" if math.isnan(p.relative) else f", {100 * p.relative:+.1f}%"
    return f"{c.name} {p.label}: {p.d:+.4f} {p.unit} [{lo:+.4f}, {hi:+.4f}{rel}]: {p.outcome}"


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
    train = [s for s in results.specs if s.measure == "train"]
    steps = sorted({s.config.train.steps for s in train})
    tokens = sorted({s.config.train.steps * s.config.train.batch_size * s.config.data.seq_len for s in train})
    seeds = sorted({s.tags.get("seed") for s in results.specs if "seed" in s.tags})
    lrs = sorted({s.config.train.lr for s in train})
    machines = sorted({f"{r['machine']['cpu']} ({r['machine']['platform']}, {r['machine']['cores']} cores, "
                       f"jax {r['machine']['jax']})" for _, r in results.rows})
    commits = sorted({(r.get("commit") or "?")[:10] for _, r in results.rows})
    wall = sum(r["wall_s"] for _, r in results.rows)
    models = sorted({(s.config.model.d_model, s.config.model.n_layers, s.config.model.n_heads,
                      s.config.data.seq_len, s.config.train.batch_size) for s in train})
    data = sorted({f"{s.config.data.source} corpus, tokenizer {s.config.data.tokenizer}, T {s.config.data.seq_len}, "
                   f"validation up to {s.config.data.val_sequences} rows" for s in train})
    return [f"- scale: **{scale}**{' (quick mode)' if quick else ''}; "
            f"runs done: {len(results.rows)}/{len(results.specs)}",
            f"- steps per training run: {', '.join(map(str, steps)) or '–'}; tokens per run: "
            f"{', '.join(f'{t:,}' for t in tokens) or '–'}; seeds: {', '.join(map(str, seeds)) or '–'}; "
            f"peak LRs: {', '.join(f'{lr:g}' for lr in lrs) or '–'}",
            "- models (d_model, layers, heads, T, batch): " + (", ".join(map(str, models)) or "–"),
            f"- machine: {'; '.join(machines) or '–'}",
            f"- commits: {', '.join(commits) or '–'}; total wall time of the runs: {wall / 60:.1f} min",
            "- data: " + ("; ".join(data) or "–")]


def reference_lines(claim: Claim, results: Results, refs: dict | None, quick: bool) -> list[str]:
    """The references on the validation rows and the bigram floor."""
    if refs is None:
        return ["- not computed (no verdict is due yet)"]
    out = [f"- count bigram: **{refs['bigram_loss']:.4f}** nats/token ({refs['bigram']}, "
           f"{refs['train_tokens']:,} training tokens)",
           f"- unigram entropy of the validation tokens: **{refs['unigram_entropy']:.4f}** nats/token",
           f"- scored on {refs['validation_tokens']:,} validation tokens ({refs.get('tokenizer', '?')}, "
           f"T {refs.get('seq_len', '?')}), the rows every run is scored on"]
    if quick:
        return [*out, "- bigram floor: not judged: quick"]
    below, text = baseline_floor(claim, results, refs)
    return [*out, f"- bigram floor: {text}"]


def _rest_of_detail(c: Criterion) -> str:
    """The criterion's detail without the comparisons it lists anyway (what is left: best LRs, counts)."""
    rest = c.detail
    for _, p in c.comparisons:
        rest = rest.replace(str(p), "")
    return "; ".join(dict.fromkeys(part.strip(" ;") for part in rest.split(";") if part.strip(" ;")))  # each once


def criterion_lines(c: Criterion, quick: bool) -> list[str]:
    if quick:
        return [f"- {c.name} {c.text}: not judged: quick"]
    mark = "not judged (runs missing)" if c.outcome is None else f"**{c.outcome}**"
    lines = [f"- {c.name} {c.text}: {mark}"]
    rest = _rest_of_detail(c) if c.outcome is not None else c.detail
    if rest:
        lines[0] += f". {rest}"
    lines += [f"  - {p}" for _, p in c.comparisons]
    return lines


def ci_width(p: stats.Paired) -> str:
    lo, hi = p.ci
    rel = "" if math.isnan(p.relative) else f" ({100 * (hi - lo) / abs(p.reference):.2f}% of mean(B))"
    return f"{p.label}: CI [{lo:+.4f}, {hi:+.4f}] {p.unit}, width {hi - lo:.4f}{rel}, margin {p.margin:.4f}"


def inconclusive_lines(criteria: Sequence[Criterion]) -> list[str]:
    """Every inconclusive criterion with how wide its comparisons' CIs were."""
    out = []
    for c in criteria:
        if c.outcome != "inconclusive":
            continue
        comps = [p for _, p in c.comparisons if p.outcome == "inconclusive"] or [p for _, p in c.comparisons]
        out.append(f"- {c.name} is inconclusive: " + ("; ".join(ci_width(p) for p in comps)
                                                      or "no comparison recorded"))
    return out


def verdict_lines(claim: Claim, results: Results, criteria: Sequence[Criterion], refs: dict | None,
                  quick: bool) -> list[str]:
    """Why the verdict is what it is: the outcomes, the bigram floor, every inconclusive criterion."""
    if quick or not results.complete or any(c.outcome is None for c in criteria):
        return []
    out = ["- criteria: " + ", ".join(f"{c.name} {c.outcome}" for c in criteria)
           + f" -> {stats.verdict([c.outcome for c in criteria])}"]
    if refs is not None:
        out.append(f"- bigram floor: {baseline_floor(claim, results, refs)[1]}")
    return out + inconclusive_lines(criteria)


def write(claim: Claim, results: Results, folder: Path, refs: dict | None, *, scale: str = "cpu",
          quick: bool = False) -> Path:
    """Write `folder/report.md` (and the claim's plots); `refs` are `references.references` of its baseline."""
    folder.mkdir(parents=True, exist_ok=True)
    criteria = judged(claim, results)
    lines = [f"# {claim.heading}: {claim.title}", "", claim.lecture.strip(), "",
             "## What the literature measured", "", claim.references.strip(), "",
             "## Setup actually run", "", *setup_lines(claim, results, scale, quick)]
    if claim.setup:
        lines += ["", claim.setup.strip()]
    lines += ["", "## References", "", *reference_lines(claim, results, refs, quick)]
    lines += ["", "## Every configuration", "", "Final validation loss in nats/token; a diverged run counts as "
              "its initial loss ln V.", "", *config_table(results)]
    meas = measure_table(results)
    if meas:
        lines += ["", "## Measurements", "", *meas]
    lines += ["", "## Criteria (fixed before any run)", "",
              "Each comparison: d = mean over seeds of A − B, its 95% CI (t interval, paired by seed), d relative "
              "to mean(B), the margin, the per-seed differences and the outcome.", ""]
    for c in criteria:
        lines += criterion_lines(c, quick)
    figures = []
    if results.rows:
        try:
            figures = claim.plots(results, folder)
            comps = [(f"{c.name} {p.label}", p) for c in criteria for _, p in c.comparisons]
            if comps and not quick:
                path = forest(comps, folder / "comparisons.png", f"{claim.heading}: the comparisons")
                figures.append((path.name, "every comparison, relative to mean(B), with its 95% CI and margin"))
        except ImportError:
            lines += ["", "(plots need matplotlib: pip install 'lecture3[plot]')"]
    if figures:
        lines += ["", "## Plots", ""]
        for name, caption in figures:
            lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    obs = claim.observations(results) if results.rows else []
    if obs:
        lines += ["", "## Observations (no criterion)", "", *[f"- {o}" for o in obs]]
    why = verdict_lines(claim, results, criteria, refs, quick)
    lines += ["", "## Verdict", "", *why, *([""] if why else []), verdict_line(claim, results, refs, quick)]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- plots


def figure(figsize: tuple[float, float]):
    """A figure and its axes, drawn off-screen without pyplot: a report never switches the matplotlib backend
    of the process it runs in, so a notebook that builds one keeps showing its own plots."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def save(fig, folder: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=80)
    return name


def loss_vs_lr(results: Results, folder: Path, name: str, arm: str = "arm", title: str = "",
               key: str = "final_loss", ylabel: str = "final val loss (diverged = ln V)", log_y: bool = False,
               **tags) -> tuple[str, str]:
    """Mean (and each seed) of `key` against the LR, one line per value of the tag `arm`."""
    fig, ax = figure(figsize=(5.5, 3.6))
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
    fig, ax = figure(figsize=(5.5, 3.6))
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
    fig, ax = figure(figsize=(max(4.0, 0.8 * len(labels) + 1.5), 3.6))
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


def summary(entries: Sequence[tuple[Claim, Results]], path: Path) -> Path:
    """The suite's forest plot: every comparison of every claim's criteria, from whatever records exist."""
    rows = [(f"{claim.short} {c.name} {p.label}", p) for claim, results in entries
            for c in judged(claim, results) for _, p in c.comparisons]
    done = {s.key for _, r in entries for s, _ in r.rows}  # a run shared by claims counts once
    total = {s.key for _, r in entries for s in r.specs}
    return forest(rows, path, f"every comparison of the claims' criteria ({len(done)}/{len(total)} runs recorded)")


def forest(rows: Sequence[tuple[str, stats.Paired]], path: Path, title: str = "") -> Path:
    """A forest plot of paired comparisons: each d and its 95% CI relative to mean(B) (in %), the margin
    of its statement drawn as grey ticks, coloured by outcome. A comparison without a reference (a per-seed
    quantity against 0) is written out in its own unit instead."""
    labels = [label if len(label) <= 80 else label[:79] + "…" for label, _ in rows]
    height = 1.4 + 0.3 * max(len(rows), 1)
    fig, ax = figure(figsize=(12, height))
    fig.subplots_adjust(left=min(0.55, 0.06 + 0.0058 * max(map(len, labels), default=0)), right=0.97,
                        top=1 - 0.45 / height, bottom=0.75 / height)
    for i, (_, p) in enumerate(rows):
        colour = OUTCOME_COLOURS[p.outcome]
        lo, hi = p.ci
        if math.isnan(p.relative):
            ax.text(0.5, i, f"{p.d:+.4f} {p.unit} [{lo:+.4f}, {hi:+.4f}]: {p.outcome} (no reference)",
                    transform=ax.get_yaxis_transform(), ha="center", va="center", fontsize=7, color=colour)
            continue
        k = 100 / abs(p.reference)
        ax.errorbar(p.d * k, i, xerr=[[(p.d - lo) * k], [(hi - p.d) * k]], fmt="o", color=colour, capsize=3, ms=4)
        margins = {"equivalent": [-p.margin, p.margin], "not_worse": [p.margin], "worse": [p.margin]}
        for m in margins.get(p.kind, []):
            ax.plot([m * k], [i], marker="|", ms=12, color="0.4")
    if not rows:
        ax.text(0, 0, "no comparison judged yet", ha="center", va="center")
    ax.axvline(0, color="0.6", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(max(len(rows), 1) - 0.5, -0.5)  # the first row on top; text-only rows inside the frame
    ax.set_xlabel("d / mean(B), % (95% CI; grey ticks: the margin; lower is better for A)")
    for outcome, colour in OUTCOME_COLOURS.items():
        ax.plot([], [], "o", color=colour, label=outcome)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path
