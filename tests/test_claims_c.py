"""Claims 9-12 (protocol v2): each criterion judged on synthetic records where the answer is known, with a
case where it passes, one where it fails and, for a paired comparison, one where it is inconclusive;
missing runs leave a criterion unjudged; each claim's grid as claims.md sizes it."""

import math

import pytest

from lecture3.experiment import protocol, runner, stats
from lecture3.experiment.spec import Results

LN_V = math.log(2048)
SIGNS = (1, -1, 1, -1)  # a per-seed wobble with mean 0: widens a paired CI without moving its mean
MINE = ("c09", "c10", "c11", "c12")


def amount(spec, seed: int) -> float:
    """`spec` is d or (d, spread): d plus spread x SIGNS[seed]."""
    d, spread = spec if isinstance(spec, tuple) else (spec, 0.0)
    return d + spread * SIGNS[seed]


def train(loss, *, diverged=False, logz=0.5, attn=5.0, capped=None, out_logit=5.0, tail=None, history=None,
          params=100_000, steps=600):
    res = {"final_loss": LN_V if diverged else loss, "final_val_loss": None if diverged else loss,
           "diverged": diverged, "initial_loss": LN_V, "train_loss_tail": tail, "history": history or [],
           "params": params, "tokens": steps * 2048, "steps": steps}
    if not diverged:
        res["probe"] = {"max_attn_logit": attn, "max_attn_logit_capped": attn if capped is None else capped,
                        "log_z_abs": logz, "max_abs_logit": out_logit}
    return res


def results(claim_name, train_fn):
    """The claim and its Results with the record `train_fn(tags)` for each run (None: the run is missing)."""
    claim = runner.load(claim_name)
    specs = runner.grid(claim)
    recs = {}
    for s in specs:
        res = train_fn(s.tags)
        if res is not None:
            recs[s.key] = {"result": res}
    return claim, Results(specs, recs)


def judged(claim_name, train_fn) -> dict:
    claim, res = results(claim_name, train_fn)
    return {c.name: c for c in claim.criteria(res)}


def outcomes(claim_name, train_fn) -> dict:
    return {name: c.outcome for name, c in judged(claim_name, train_fn).items()}


def without(fn, **tags):
    """`fn` with the runs matching `tags` missing."""
    return lambda t: None if all(stats_same(t.get(k), v) for k, v in tags.items()) else fn(t)


def stats_same(a, b) -> bool:
    return math.isclose(a, b) if isinstance(a, float) and isinstance(b, float) else a == b


def noise(tags):
    return 0.001 * tags.get("seed", 0)


def grid(name):
    return runner.grid(runner.load(name))


# ---------------------------------------------------------------- every claim of this file


@pytest.mark.parametrize("name", MINE)
def test_without_records_no_criterion_is_judged(name):
    claim, res = results(name, lambda tags: None)
    crits = claim.criteria(res)
    assert crits and all(c.outcome is None for c in crits)


@pytest.mark.parametrize("name", MINE)
def test_grid_has_the_protocols_seeds_and_a_baseline_arm(name):
    claim = runner.load(name)
    specs = runner.grid(claim)
    assert len(protocol.SEEDS) == 4
    arms = {tuple(sorted((k, v) for k, v in s.tags.items() if k != "seed")) for s in specs}
    for arm in arms:  # every arm at every LR runs every seed
        assert sorted(s.tags["seed"] for s in specs if all(stats_same(s.tags.get(k), v) for k, v in arm)) \
            == list(protocol.SEEDS)
    base = Results(specs, {})
    assert claim.baseline and base.expected(**claim.baseline) >= len(protocol.SEEDS)


# ---------------------------------------------------------------- claim 9: weight decay

C09_STEPS = 1200


def c09_run(tags, end=None, mid=None, gap=None, diverged=()):
    """end, mid, gap: {wd: spec} added to that WD's final loss, loss at 50% and train-val gap;
    `diverged`: (wd, seed) pairs whose run diverged after 50%."""
    wd, seed = tags["wd"], tags["seed"]

    def pick(specs):
        return amount((specs or {}).get(wd, 0.0), seed)
    e = 3.0 + noise(tags) + pick(end)
    m = 3.5 + noise(tags) + pick(mid)
    tail = e + 0.01 + pick(gap)
    # the log at step 1,080 holds steps 1,071-1,080: outside the last 10%, so never counted
    hist = [{"step": 600, "loss": 3.6, "val_loss": m}, {"step": 1080, "loss": 50.0 + 10 * wd},
            *({"step": s, "loss": tail} for s in range(1090, C09_STEPS + 1, 10))]
    hist[-1]["val_loss"] = e
    if (wd, seed) in diverged:
        return train(0.0, diverged=True, history=hist[:2], steps=C09_STEPS)
    return train(e, history=hist, steps=C09_STEPS)


WD_BETTER = {0.1: -0.05}  # WD 0.1 ends 0.05 nats below WD 0, equal at 50%


def test_claim9_all_pass():
    assert outcomes("c09", lambda t: c09_run(t, end=WD_BETTER)) == {"(a)": "pass", "(b)": "pass", "(c)": "pass"}


@pytest.mark.parametrize("gap, expected", [
    ({0.3: 0.05}, "fail"), ({0.1: -0.05}, "fail"),  # each WD > 0 counts
    ({0.3: (0.01, 0.02)}, "inconclusive"),  # CI about [-0.027, 0.047] against the margin 0.02
    ({0.3: 0.015}, "pass"), ({0.3: -0.015}, "pass"),  # within 0.02
    ({0.3: 0.025}, "fail"),
])
def test_claim9_a_gap_equivalence(gap, expected):
    assert outcomes("c09", lambda t: c09_run(t, end=WD_BETTER, gap=gap))["(a)"] == expected


def test_claim9_a_diverged_run_has_no_gap():
    out = judged("c09", lambda t: c09_run(t, end=WD_BETTER, diverged={(0.3, 0)}))
    assert out["(a)"].outcome == "inconclusive" and "WD 0.3 seed 0" in out["(a)"].detail
    assert out["(c)"].outcome in stats.OUTCOMES  # a diverged run counts as ln V, never dropped


@pytest.mark.parametrize("end, expected", [
    ({0.3: -0.05}, "pass"),  # either WD > 0 may be the better one
    ({0.1: 0.05, 0.3: 0.05}, "fail"),
    ({0.1: (-0.01, 0.05), 0.3: 0.05}, "inconclusive"),  # WD 0.1 inconclusive, WD 0.3 fails
])
def test_claim9_b_some_wd_better(end, expected):
    assert outcomes("c09", lambda t: c09_run(t, end=end))["(b)"] == expected


@pytest.mark.parametrize("mid, expected", [
    ({0.1: -0.1}, "fail"),  # the advantage at 50% (0.1) is larger than at the end (0.05)
    ({0.1: (-0.05, 0.05)}, "inconclusive"),  # adv_50% − adv_end = ∓0.05 per seed
])
def test_claim9_c_advantage_grows(mid, expected):
    assert outcomes("c09", lambda t: c09_run(t, end=WD_BETTER, mid=mid))["(c)"] == expected


def test_claim9_c_takes_the_wd_with_the_lower_final_loss_when_both_pass_b():
    both = {0.1: -0.05, 0.3: -0.08}
    out = judged("c09", lambda t: c09_run(t, end=both, mid={0.3: -0.2}))  # WD 0.3's advantage shrank
    assert out["(b)"].outcome == "pass" and out["(c)"].outcome == "fail" and "WD 0.3" in out["(c)"].detail
    assert outcomes("c09", lambda t: c09_run(t, end=both, mid={0.1: -0.2}))["(c)"] == "pass"


def test_claim9_c_is_judged_when_no_wd_passes_b():
    worse = {0.1: 0.05, 0.3: 0.02}  # WD 0.3 the lower mean final loss
    out = outcomes("c09", lambda t: c09_run(t, end=worse, mid={0.3: 0.1}))  # 0.1 worse at 50%, 0.02 at the end
    assert out["(b)"] == "fail" and out["(c)"] == "pass"
    assert outcomes("c09", lambda t: c09_run(t, end=worse))["(c)"] == "fail"


def test_claim9_missing_run():
    out = outcomes("c09", without(lambda t: c09_run(t, end=WD_BETTER), wd=0.1, seed=3))
    assert out == {"(a)": None, "(b)": None, "(c)": None}


def test_claim9_grid():
    specs = grid("c09")
    assert len(specs) == 3 * 4
    assert {s.tags["wd"] for s in specs} == {0.0, 0.1, 0.3}
    for s in specs:
        t = s.config.train
        assert (t.steps, t.final_lr, t.eval_every, t.decay_embeddings, t.schedule) == (1200, 0.0, 600, True, "cosine")
        assert t.weight_decay == (s.tags["wd"] or None)
        assert s.config.model.d_model == 128 and t.lr == 3e-3


# ---------------------------------------------------------------- claim 10: z-loss


def c10_run(tags, on_z=0.3, off_z=(2.0,) * 4, shift=-0.05, edit=None):
    """z-loss on: |log Z| `on_z`; off at LR 0.1: `off_z` per seed; at LR 0.1 z-loss's final loss moves by
    the spec `shift`; `edit(tags, record)` changes any record."""
    on, seed = tags["arm"] == "z_loss=1e-4", tags["seed"]
    top = math.isclose(tags["lr"], 0.1)
    loss = 3.0 + noise(tags) + (amount(shift, seed) if on and top else 0.0)
    rec = train(loss, logz=on_z if on else off_z[seed] if top else 1.5, steps=1200)
    return edit(tags, rec) if edit else rec


def test_claim10_all_pass():
    assert outcomes("c10", c10_run) == {"(a)": "pass", "(b)": "pass"}


def _at(arm, lr, seed):
    return lambda t: t["arm"] == arm and math.isclose(t["lr"], lr) and t["seed"] == seed


def test_claim10_a_every_run_with_z_loss():
    one = _at("z_loss=1e-4", 3e-2, 2)
    assert outcomes("c10", lambda t: c10_run(t, on_z=1.2 if one(t) else 0.3))["(a)"] == "fail"
    assert outcomes("c10", lambda t: c10_run(t, on_z=1.0 if one(t) else 0.3))["(a)"] == "fail"  # "< 1"
    diverged = _at("z_loss=1e-4", 1e-2, 0)
    assert outcomes("c10", lambda t: train(0.0, diverged=True) if diverged(t) else c10_run(t))["(a)"] == "fail"


@pytest.mark.parametrize("shift, off_z, expected", [
    (-0.05, (2.0,) * 4, "pass"),  # the paired comparison passes
    ((0.0, 0.05), (8.0, 8.0, 8.0, 2.0), "pass"),  # paired inconclusive, count 3 of 4
    (0.05, (8.0, 8.0, 8.0, 2.0), "pass"),  # paired fails, count 3 of 4
    (0.05, (8.0, 8.0, 2.0, 2.0), "fail"),  # paired fails, count 2
    ((0.0, 0.05), (8.0, 8.0, 2.0, 2.0), "inconclusive"),  # paired inconclusive, count 2
    (0.05, (8.0, 8.0, 8.0, 5.0), "pass"),
    (0.05, (8.0, 8.0, 5.0, 5.0), "fail"),  # "> 5"
])
def test_claim10_b_better_or_count(shift, off_z, expected):
    assert outcomes("c10", lambda t: c10_run(t, shift=shift, off_z=off_z))["(b)"] == expected


def test_claim10_b_diverged_run_without_z_loss_counts_its_last_logged_log_z():
    def edit(history):
        return lambda t, rec: (train(0.0, diverged=True, history=history)
                               if t["arm"] == "z_loss=off" and math.isclose(t["lr"], 0.1) and t["seed"] < 3 else rec)
    logged = [{"step": 10, "log_z_abs": 9.0}, {"step": 20, "log_z_abs": None}]
    assert "> 5 in 3 of 4" in judged("c10", lambda t: c10_run(t, edit=edit(logged)))["(b)"].detail
    assert "> 5 in 0 of 4" in judged("c10", lambda t: c10_run(t, edit=edit([])))["(b)"].detail


def test_claim10_missing_runs():
    assert outcomes("c10", without(c10_run, arm="z_loss=1e-4", lr=1e-2, seed=1)) == {"(a)": None, "(b)": "pass"}
    assert outcomes("c10", without(c10_run, arm="z_loss=off", lr=0.1, seed=3)) == {"(a)": "pass", "(b)": None}


def test_claim10_grid():
    specs = grid("c10")
    assert len(specs) == 2 * 3 * 4
    assert sorted({s.tags["lr"] for s in specs}) == [1e-2, 3e-2, 1e-1]
    assert {s.config.train.z_loss for s in specs} == {None, 1e-4}
    for s in specs:
        assert s.config.train.steps == 1200 and s.config.train.weight_decay is None
        assert s.config.model.d_model == 64


# ---------------------------------------------------------------- claim 11: QK-norm


def lr_loss(tags, best=3e-3, slope=1.0, shift=0.0):
    """A loss over log LR: 0.5 nats per decade below `best`, `slope` per decade above, moved by `shift`."""
    lr, seed = tags["lr"], tags["seed"]
    excess = 0.5 * math.log10(best / lr) if lr <= best else amount(slope, seed) * math.log10(lr / best)
    return 3.0 + noise(tags) + amount(shift, seed) + excess


def c11_run(tags, slope=0.3, low=None, logit=(500.0, 5.0), edit=None):
    """QK-norm's slope above LR 3e-3 is `slope` (off's 1.0); at the LRs in `low` (lr: spec) its loss moves;
    the max attention logit is logit[0] off, logit[1] with QK-norm; `edit(tags, record)` changes any record."""
    on = tags["arm"] == "per_head"
    shift = next((v for lr, v in (low or {}).items() if on and math.isclose(lr, tags["lr"])), 0.0)
    rec = train(lr_loss(tags, slope=slope if on else 1.0, shift=shift), attn=logit[on])
    return edit(tags, rec) if edit else rec


def test_claim11_all_pass():
    assert outcomes("c11", c11_run) == {"(a)": "pass", "(b)": "pass", "(c)": "pass"}


@pytest.mark.parametrize("slope, expected", [(1.5, "fail"), ((1.0, 0.3), "inconclusive")])
def test_claim11_a_sensitivity_better(slope, expected):
    assert outcomes("c11", lambda t: c11_run(t, slope=slope))["(a)"] == expected


def _off_top(seed):
    return lambda t: t["arm"] == "off" and math.isclose(t["lr"], 0.3) and t["seed"] == seed


def test_claim11_b_ratio_in_every_seed():
    def with_off_logit(value, seed=2):
        def edit(t, rec):
            if _off_top(seed)(t):
                rec["probe"]["max_attn_logit"] = value
            return rec
        return edit
    assert outcomes("c11", lambda t: c11_run(t, edit=with_off_logit(40.0)))["(b)"] == "fail"  # 8x in one seed
    assert outcomes("c11", lambda t: c11_run(t, edit=with_off_logit(47.5)))["(b)"] == "fail"  # 9.5x
    assert outcomes("c11", lambda t: c11_run(t, edit=with_off_logit(50.0)))["(b)"] == "pass"  # exactly 10x


def test_claim11_b_diverged_run_uses_its_last_logged_logit():
    def diverged(history):
        return lambda t, rec: train(0.0, diverged=True, history=history) if _off_top(0)(t) else rec
    logged = [{"step": 10, "max_attn_logit": 800.0}, {"step": 20, "max_attn_logit": None}]
    assert outcomes("c11", lambda t: c11_run(t, edit=diverged(logged)))["(b)"] == "pass"
    assert outcomes("c11", lambda t: c11_run(t, edit=diverged([])))["(b)"] == "fail"


@pytest.mark.parametrize("low, expected", [
    ({1e-3: 0.1, 3e-3: 0.1}, "fail"),
    ({1e-3: 0.1}, "fail"),  # each LR must pass
    ({3e-3: -0.1}, "fail"),
    ({1e-3: (0.0, 0.05), 3e-3: (0.0, 0.05)}, "inconclusive"),
    ({1e-3: 0.02, 3e-3: -0.02}, "pass"),  # within 1% (0.03)
    ({3e-3: 0.04}, "fail"),
])
def test_claim11_c_equivalent_at_low_lrs(low, expected):
    assert outcomes("c11", lambda t: c11_run(t, low=low))["(c)"] == expected


def test_claim11_missing_runs():
    assert outcomes("c11", without(c11_run, arm="off", lr=0.3, seed=3)) == {"(a)": None, "(b)": None, "(c)": "pass"}
    assert outcomes("c11", without(c11_run, arm="per_head", lr=1e-3, seed=0)) == \
        {"(a)": None, "(b)": "pass", "(c)": None}


def test_claim11_grid():
    specs = grid("c11")
    assert len(specs) == 2 * 6 * 4
    assert sorted({s.tags["lr"] for s in specs}) == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    assert {s.config.model.qk_norm for s in specs} == {None, "per_head"}
    for s in specs:
        assert (s.config.model.n_layers, s.config.model.d_model, s.config.train.steps) == (6, 64, protocol.STEPS)


# ---------------------------------------------------------------- claim 12: soft-capping

LOG_LOGITS = {"none": math.log(300.0), "caps_50_30": math.log(300.0), "caps_5_10": math.log(30.0)}


def c12_run(tags, slope=None, shift=None, best=None, log_logit=None, edit=None):
    """Per arm: slope above the best LR (1.0), shift of the loss (0), best LR (3e-3), and the log of the
    pre-cap max attention logit at LR 0.1 (LOG_LOGITS); `edit(tags, record)` changes any record."""
    arm, seed = tags["arm"], tags["seed"]
    loss = lr_loss(tags, best=(best or {}).get(arm, 3e-3), slope=(slope or {}).get(arm, 1.0),
                   shift=(shift or {}).get(arm, 0.0))
    attn = math.exp(amount({**LOG_LOGITS, **(log_logit or {})}[arm], seed))
    rec = train(loss, attn=attn if math.isclose(tags["lr"], 0.1) else 5.0)
    return edit(tags, rec) if edit else rec


def test_claim12_all_pass():
    assert outcomes("c12", c12_run) == {"(a)": "pass", "(b)": "pass", "(c)": "pass"}


@pytest.mark.parametrize("log_logit, expected", [
    ({"caps_5_10": math.log(600.0)}, "fail"),
    ({"caps_5_10": (math.log(300.0), 1.0)}, "inconclusive"),
])
def test_claim12_a_pre_cap_logit_lower(log_logit, expected):
    assert outcomes("c12", lambda t: c12_run(t, log_logit=log_logit))["(a)"] == expected


def test_claim12_a_diverged_run_without_caps():
    def diverged(history):
        return lambda t, rec: (train(0.0, diverged=True, history=history)
                               if t["arm"] == "none" and math.isclose(t["lr"], 0.1) and t["seed"] == 1 else rec)
    logged = [{"step": 10, "max_attn_logit": 1000.0}, {"step": 20, "max_attn_logit": None}]
    assert outcomes("c12", lambda t: c12_run(t, edit=diverged(logged)))["(a)"] == "pass"
    assert outcomes("c12", lambda t: c12_run(t, edit=diverged([])))["(a)"] == "inconclusive"


@pytest.mark.parametrize("shift, expected", [
    ({"caps_50_30": 0.1}, "fail"),
    ({"caps_50_30": (0.0, 0.05)}, "inconclusive"),
    ({"caps_50_30": -0.02}, "pass"),
    ({"caps_50_30": 0.04}, "fail"),  # 1% of 3.0 is 0.03
])
def test_claim12_b_equivalent_at_best_lr(shift, expected):
    assert outcomes("c12", lambda t: c12_run(t, shift=shift))["(b)"] == expected


def test_claim12_b_takes_each_arms_own_best_lr():
    out = judged("c12", lambda t: c12_run(t, best={"caps_50_30": 1e-2}))
    assert out["(b)"].outcome == "pass" and "caps_50_30: 0.01" in out["(b)"].detail


@pytest.mark.parametrize("slope, expected", [
    ({"caps_5_10": 1.2}, "fail"),
    ({"caps_5_10": 1.03}, "fail"),  # 0.018 nats worse
    ({"caps_50_30": 1.2}, "fail"),  # each pair
    ({"caps_5_10": (1.0, 0.1)}, "inconclusive"),
    ({"caps_5_10": 0.8, "caps_50_30": 1.01}, "pass"),  # 0.006 nats worse: within 0.01
])
def test_claim12_c_sensitivity_not_worse(slope, expected):
    assert outcomes("c12", lambda t: c12_run(t, slope=slope))["(c)"] == expected


def test_claim12_missing_runs():
    assert outcomes("c12", without(c12_run, arm="caps_5_10", lr=0.1, seed=1)) == \
        {"(a)": None, "(b)": "pass", "(c)": None}
    assert outcomes("c12", without(c12_run, arm="caps_50_30", lr=1e-3, seed=0)) == \
        {"(a)": "pass", "(b)": None, "(c)": None}


def test_claim12_grid():
    specs = grid("c12")
    assert len(specs) == 3 * 5 * 4
    assert sorted({s.tags["lr"] for s in specs}) == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    caps = {(s.config.model.attn_logit_softcap, s.config.model.final_logit_softcap) for s in specs}
    assert caps == {(None, None), (50.0, 30.0), (5.0, 10.0)}
    for s in specs:
        assert s.config.model.d_model == 64 and s.config.train.steps == protocol.STEPS
