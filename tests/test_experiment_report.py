"""report.md under protocol v2, on small synthetic claims: each criterion's outcome and comparisons, the
references and the bigram floor, the inconclusive criteria with their CI widths, quick mode's wording, and
the suite's forest plot."""

import math

import pytest

from lecture3.experiment import judge, protocol, report
from lecture3.experiment.spec import Claim, Results, RunSpec

REFS = {"bigram_loss": 3.9, "unigram_entropy": 6.1, "bigram": "a synthetic bigram", "validation_tokens": 1000,
        "train_tokens": 10_000, "tokenizer": "bpe:2048", "seq_len": 128}
LRS = (1e-3, 3e-3)
SEEDS = (0, 1, 2, 3)
NOISE = (-0.01, -0.01, 0.01, 0.01)


MODELS = {"new": protocol.model_s(norm="layernorm"), "base": protocol.model_s()}  # two configs: two keys


def _specs():
    return [RunSpec(protocol.config(MODELS[arm], lr=lr, seed=s), {"arm": arm, "lr": lr, "seed": s})
            for arm in MODELS for lr in LRS for s in SEEDS]


def _record(loss: float) -> dict:
    return {"result": {"final_loss": loss, "final_val_loss": loss, "diverged": False, "initial_loss": math.log(2048)},
            "machine": {"cpu": "a CPU", "platform": "cpu", "cores": 2, "jax": "0"}, "commit": "abcdef1234",
            "wall_s": 60.0}


def results(base: float = 3.5, gap: float = -0.05, drop: int = 0) -> Results:
    """base's loss at its best LR 3e-3 is `base`; new is `gap` away from it, seed by seed (noise 0.01)."""
    specs = _specs()
    recs = {}
    for spec in specs:
        t = spec.tags
        loss = base + (0.2 if t["lr"] == 1e-3 else 0.0) + (gap + NOISE[t["seed"]] if t["arm"] == "new" else 0.0)
        recs[spec.key] = _record(loss)
    for spec in specs[:drop]:
        del recs[spec.key]
    return Results(specs, recs)


def criteria(res: Results) -> list:
    return [judge.criterion("(a)", "new better than base at each's best LR",
                            judge.compare(res, {"arm": "new"}, {"arm": "base"}, "better", best_lr=True)),
            judge.criterion("(b)", "new equivalent to base within 1%",
                            judge.compare(res, {"arm": "new", "lr": 3e-3}, {"arm": "base", "lr": 3e-3},
                                          "equivalent"))]


CLAIM = Claim(number=99, name="c99_synthetic", title="a synthetic claim", lecture="What it says.",
              references="What the literature measured.", runs=lambda scale: _specs(), criteria=criteria,
              baseline={"arm": "base"})


def _write(tmp_path, res, refs=REFS, quick=False) -> list[str]:
    return report.write(CLAIM, res, tmp_path, refs, quick=quick).read_text().splitlines()


def test_each_criterion_prints_its_outcome_and_its_comparisons(tmp_path):
    res = results(gap=-0.08)  # (a) passes; (b): CI [-0.098, -0.062] beyond the 1% margin of 3.5 = 0.035: fails
    lines = _write(tmp_path, res)
    a = next(i for i, line in enumerate(lines) if line.startswith("- (a)"))
    assert lines[a].endswith("**pass**. best LR arm=new: 0.003, arm=base: 0.003")
    comp = [c for _, c in report.judged(CLAIM, res)[0].comparisons][0]
    assert lines[a + 1] == f"  - {comp}"  # d, CI, relative and outcome
    assert "relative -2.29%" in lines[a + 1] and lines[a + 1].endswith(": pass")
    assert any(line.startswith("- (b)") and "**fail**" in line for line in lines)
    assert lines[-1] == "Verdict: partly reproduced"
    assert "- criteria: (a) pass, (b) fail -> partly reproduced" in lines
    assert (tmp_path / "comparisons.png").read_bytes()[:4] == b"\x89PNG"


def test_the_setup_states_tokens_per_run_and_the_references_their_values(tmp_path):
    text = "\n".join(_write(tmp_path, results()))
    assert "tokens per run: 1,228,800" in text  # 600 steps x 16 x 128
    refs = text.split("## References", 1)[1].split("##", 1)[0]
    assert "count bigram: **3.9000** nats/token (a synthetic bigram" in refs
    assert "unigram entropy of the validation tokens: **6.1000**" in refs
    assert "the baseline [arm=base] at its best LR 0.003 ends at 3.5000 nats/token (mean of 4 seeds), below" in refs


def test_a_baseline_not_below_the_bigram_makes_the_claim_inconclusive_whatever_its_criteria_say(tmp_path):
    res = results(base=4.0, gap=-0.1)  # (a) pass, (b) fail: "partly reproduced" but for the floor
    assert report.verdict_of(CLAIM, res, REFS) == report.UNDER_TRAINED
    assert report.verdict_of(CLAIM, res, {**REFS, "bigram_loss": 4.1}) == "partly reproduced"
    lines = _write(tmp_path, res)
    assert lines[-1] == "Verdict: inconclusive (under-trained)"
    why = [line for line in lines if line.startswith("- bigram floor:")]
    assert why and "ends at 4.0000" in why[-1] and "NOT below the count bigram's 3.9000" in why[-1]
    assert "under-trained" in why[-1]


def test_every_inconclusive_criterion_is_named_with_its_ci_width(tmp_path):
    res = results(gap=-0.02)  # CI of (b) about [-0.038, -0.002] against a margin of 0.035: inconclusive
    crit = report.judged(CLAIM, res)
    assert [c.outcome for c in crit] == ["pass", "inconclusive"]
    lo, hi = crit[1].comparisons[0][1].ci
    lines = _write(tmp_path, res)
    named = [line for line in lines if line.startswith("- (b) is inconclusive:")]
    assert len(named) == 1 and f"width {hi - lo:.4f}" in named[0] and f"CI [{lo:+.4f}, {hi:+.4f}]" in named[0]
    assert lines[-1] == "Verdict: inconclusive"


def test_quick_mode_judges_nothing(tmp_path):
    res = results()
    lines = _write(tmp_path, res, quick=True)
    crit = lines[lines.index("## Criteria (fixed before any run)"):lines.index("## Verdict")]
    judged = [line for line in crit if line.startswith("- (")]
    assert judged == ["- (a) new better than base at each's best LR: not judged: quick",
                      "- (b) new equivalent to base within 1%: not judged: quick"]
    text = "\n".join(lines)
    for word in ("**pass**", "**fail**", "CI [", "SE", "0.0000", "inconclusive"):
        assert word not in text.split("## Criteria", 1)[1], word
    assert "- bigram floor: not judged: quick" in lines
    assert lines[-1] == f"Verdict: {report.QUICK_VERDICT}"
    assert not (tmp_path / "comparisons.png").exists()


def test_missing_runs_leave_the_claim_incomplete_and_its_criteria_unjudged(tmp_path):
    res = results(drop=3)
    assert report.verdict_of(CLAIM, res, None) == "incomplete (13/16 runs done)"
    lines = _write(tmp_path, res, refs=None)
    assert any(line.startswith("- (a)") and "not judged (runs missing)" in line for line in lines)
    assert lines[-1] == "Verdict: incomplete (13/16 runs done)"


def test_a_verdict_that_is_due_needs_the_references():
    with pytest.raises(ValueError, match="needs the references"):
        report.verdict_of(CLAIM, results(), None)


def test_the_summary_is_a_forest_plot_of_every_comparison(tmp_path):
    other = Claim(number=98, name="c98_other", title="another", lecture="", references="", runs=lambda s: _specs(),
                  criteria=lambda res: [judge.criterion("(a)", "a gap", judge.compare_diffs({0: 0.1, 1: 0.2, 2: 0.1},
                                                                                           "better"))])
    path = report.summary([(CLAIM, results()), (other, results()), (CLAIM, results(drop=2))], tmp_path / "s.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000
    assert report.summary([], tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG"


def test_a_report_leaves_the_matplotlib_backend_of_its_process_alone(tmp_path):
    """A notebook that draws a report keeps its own backend (inline, say): the plots are drawn without pyplot."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        assert report.summary([(CLAIM, results())], tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
        report.bars(["a", "b"], [[1.0, 2.0], [3.0]], tmp_path, "b.png", "ms")
        assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
        assert matplotlib.get_backend().lower() == "pdf"
    finally:
        matplotlib.use(before)


def test_the_key_comparison_is_the_one_that_decides_the_verdict():
    """The README table's comparison: the first that did not pass, in the first criterion that did not pass;
    the first comparison of all only when every criterion passed."""
    deciding = report.judged(CLAIM, results(gap=-0.2))  # (a) better passes, (b) equivalent within 1% fails
    assert [c.outcome for c in deciding] == ["pass", "fail"]
    assert report.key_comparison(deciding).startswith("(b) ") and report.key_comparison(deciding).endswith(": fail")
    passing = [deciding[0], deciding[0]]
    assert report.key_comparison(passing) == report.key_comparison(deciding[:1])
    assert report.key_comparison(passing).startswith("(a) ") and report.key_comparison(passing).endswith(": pass")
    assert report.key_comparison(report.judged(CLAIM, results(drop=16))) == ""  # nothing judged yet
    count = judge.criterion("(c)", "|log Z| < 1 in every run", judge.check(False, "largest |log Z| 9.2; seed 0: 9.1"))
    assert report.key_comparison([deciding[0], count, deciding[1]]) == "(c) largest |log Z| 9.2: fail"  # by a count
    assert report.key_comparison([judge.criterion("(c)", "a count", judge.check(True, "3 of 4"))]) == "(c) 3 of 4: pass"


def test_a_detail_that_several_comparisons_share_is_printed_once():
    """(c) of claim 8 compares three shapes with the same best shape: the report names it once."""
    res = results()
    parts = [judge.compare(res, {"arm": "new", "lr": lr}, {"arm": "base", "lr": lr}, "better") for lr in LRS]
    combined = judge.all_of([(o, f"best base; {d}", comps) for o, d, comps in parts])
    line = report.criterion_lines(judge.criterion("(c)", "each lr better", combined), quick=False)[0]
    assert line == "- (c) each lr better: **pass**. best base"
