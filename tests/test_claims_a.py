"""Claims 1-6 (protocol v2): every criterion judged on synthetic records where the answer is known, with a
case where it passes, one where it fails and, for a paired comparison, one where it is inconclusive;
missing runs leave a criterion unjudged (None); and each claim's grid as the protocol sizes it (4 seeds,
600 steps, S's LR grid shared through `protocol.baseline_specs`)."""

import math

import pytest

from lecture3.experiment import protocol, runner
from lecture3.experiment.spec import Results

LN_V = math.log(2048)
MINE = ("c01", "c02", "c03", "c04", "c05", "c06")
SMALL = (0.001, -0.002, 0.0015, -0.0005)  # per-seed noise: a paired CI far narrower than the effects below
WIDE = (0.05, -0.05, 0.06, -0.04)  # per-seed noise: a CI of about ±0.09 nats, wider than any margin here


def train(loss, *, diverged=False):
    res = {"final_loss": LN_V if diverged else loss, "final_val_loss": None if diverged else loss,
           "diverged": diverged, "initial_loss": LN_V, "train_loss_tail": None, "history": [],
           "params": 100_000, "tokens": 1_228_800}
    if not diverged:
        res["probe"] = {"max_attn_logit": 5.0, "max_attn_logit_capped": 5.0, "log_z_abs": 0.5, "max_abs_logit": 5.0}
    return res


def results(claim_name, train_fn, measure_fn=None):
    """The claim's grid with the records `train_fn(tags)` / `measure_fn(measure, tags)` give (None: missing)."""
    claim = runner.load(claim_name)
    specs = runner.grid(claim)
    recs = {}
    for s in specs:
        res = train_fn(s.tags) if s.measure == "train" else measure_fn(s.measure, s.tags)
        if res is not None:
            recs[s.key] = {"result": res}
    return claim, Results(specs, recs)


def outcomes(claim, res):
    return [c.outcome for c in claim.criteria(res)]


def judged(name, train_fn, measure_fn=None):
    return outcomes(*results(name, train_fn, measure_fn))


def seed_noise(tags, pattern=SMALL):
    return pattern[tags["seed"]]


def lr_curve(best_lr=3e-3, depth=1.0, diverge_above=None, shift=0.0, pattern=SMALL):
    """A U-shaped loss over log LR (depth: nats per decade; a per-seed depth when a dict), diverging above
    `diverge_above`."""
    def loss(tags):
        lr, seed = tags["lr"], tags["seed"]
        if diverge_above is not None and lr > diverge_above:
            return train(0.0, diverged=True)
        d = depth[seed] if isinstance(depth, dict) else depth
        return train(3.0 + shift + d * abs(math.log10(lr / best_lr)) + pattern[seed])
    return loss


def by_arm(**fns):
    return lambda tags: fns[tags["arm"]](tags)


# ---------------------------------------------------------------- grids


@pytest.mark.parametrize("name", MINE)
def test_grid_is_the_protocol(name):
    claim = runner.load(name)
    specs = runner.grid(claim)
    assert len({s.key for s in specs}) == len(specs)
    train_specs = [s for s in specs if s.measure == "train"]
    assert {s.config.train.steps for s in train_specs} == {protocol.STEPS} == {600}
    arms = {}
    for s in train_specs:
        arms.setdefault(tuple((k, v) for k, v in s.tags.items() if k != "seed"), []).append(s.tags["seed"])
    assert arms and all(sorted(seeds) == list(protocol.SEEDS) == [0, 1, 2, 3] for seeds in arms.values())
    assert Results(specs, {}).expected(**claim.baseline) > 0  # the baseline arm is in the grid
    assert all(s.exclusive for s in specs if "timing" in s.measure)


def test_s_grid_is_shared_by_claims_3_to_6():
    base = protocol.baseline_specs("cpu")
    assert len(base) == len(protocol.LRS) * len(protocol.SEEDS) == 12
    keys = {s.key for s in base}
    for name, arm in (("c03", "rmsnorm"), ("c04", "no_bias"), ("c05", "baseline"), ("c06", "baseline")):
        specs = runner.grid(runner.load(name))
        assert {s.key for s in specs if s.tags.get("arm") == arm and s.measure == "train"} == keys, name
        assert runner.load(name).baseline == {"arm": arm}


def test_claim1_grid():
    specs = runner.grid(runner.load("c01"))
    assert all(s.config.model.n_layers == 6 for s in specs)
    trained = [s for s in specs if s.measure == "train"]
    assert len(trained) == 3 * 2 * 2 * 4
    assert {s.config.train.warmup_steps for s in trained} == {0, 30}
    assert sum(s.measure == "grad_norms_at_init" for s in specs) == 2 * 4
    assert {s.args["n_batches"] for s in specs if s.measure == "grad_norms_at_init"} == {4}


def test_claim2_grid():
    specs = runner.grid(runner.load("c02"))
    assert len(specs) == 2 * 5 * 4
    assert {s.config.model.d_model for s in specs} == {64} and {s.config.model.n_layers for s in specs} == {6}


# ---------------------------------------------------------------- claim 1


def c01_measure(post_ratio=5.0, pre_ratio=1.0):
    def fn(measure, tags):
        r = post_ratio if tags["arm"] == "post" else pre_ratio
        layers = [0.2 * r ** (i / 5) for i in range(6)]
        return {"per_layer": layers, "per_batch": [layers] * 4}
    return fn


def c01_train(gap_cold=0.2, gap_warm=0.02, gap_1e2=None, pattern=SMALL):
    """pre = 3.0; post = pre + a gap: without warmup `gap_cold` (at 1e-2: `gap_1e2`, a number, None: the same,
    or "diverged"), with warmup `gap_warm`; per-seed `pattern` on post without warmup."""
    def fn(tags):
        base = 3.0 + 0.01 * tags["seed"]
        if tags["arm"] == "pre":
            return train(base)
        if tags["warmup"] > 0:
            return train(base + gap_warm + seed_noise(tags))
        gap = gap_1e2 if tags["lr"] == 1e-2 and gap_1e2 is not None else gap_cold
        if gap == "diverged":
            return train(0.0, diverged=True)
        return train(base + gap + seed_noise(tags, pattern))
    return fn


def test_claim1_a():
    assert judged("c01", c01_train(), c01_measure(5.0, 1.0))[0] == "pass"
    assert judged("c01", c01_train(), c01_measure(2.0, 1.0))[0] == "fail"  # post's ratio < 3
    assert judged("c01", c01_train(), c01_measure(5.0, 2.5))[0] == "fail"  # pre's ratio outside [0.5, 2]


def test_claim1_b_each_lr():
    assert judged("c01", c01_train(), c01_measure())[1] == "pass"
    assert judged("c01", c01_train(gap_1e2="diverged"), c01_measure())[1] == "pass"  # diverged = ln V
    assert judged("c01", c01_train(gap_1e2=-0.1), c01_measure())[1] == "fail"  # post better at 1e-2
    assert judged("c01", c01_train(gap_1e2=0.0, pattern=WIDE), c01_measure())[1] == "inconclusive"


def test_claim1_c_narrowing_gap():
    assert judged("c01", c01_train(0.2, 0.02), c01_measure())[2] == "pass"
    assert judged("c01", c01_train(0.2, 0.3), c01_measure())[2] == "fail"  # warmup widens the gap
    assert judged("c01", c01_train(0.2, 0.2, pattern=WIDE), c01_measure())[2] == "inconclusive"


def test_claim1_missing_runs_are_not_judged():
    claim, res = results("c01", lambda t: train(3.0) if t["arm"] == "pre" else None,
                         lambda m, t: c01_measure()(m, t) if t["arm"] == "pre" else None)
    assert outcomes(claim, res) == [None, None, None]


# ---------------------------------------------------------------- claim 2


def test_claim2_criteria():
    pre, sand = lr_curve(depth=1.0, diverge_above=1e-2), lr_curve(depth=0.5, diverge_above=3e-2)
    assert judged("c02", by_arm(sandwich=sand, pre=pre)) == ["pass", "pass", "pass"]
    assert judged("c02", by_arm(sandwich=pre, pre=sand)) == ["fail", "fail", "pass"]
    # (a) the same sensitivity on average, seed by seed either way; (c) a wide spread at the best LR
    wobbly = lr_curve(depth={0: 1.3, 1: 0.7, 2: 1.35, 3: 0.75}, diverge_above=1e-2, pattern=WIDE)
    assert judged("c02", by_arm(sandwich=wobbly, pre=pre)) == ["inconclusive", "pass", "inconclusive"]
    # (c) fails: sandwich 0.2 nats worse at its best LR
    worse = lr_curve(depth=0.5, diverge_above=3e-2, shift=0.2)
    assert judged("c02", by_arm(sandwich=worse, pre=pre))[2] == "fail"


def test_claim2_missing_runs_are_not_judged():
    assert judged("c02", lambda t: lr_curve()(t) if t["arm"] == "pre" else None) == [None, None, None]


# ---------------------------------------------------------------- claims 3 and 6: step times paired by round


ROUNDS = (0.100, 0.102, 0.099, 0.101, 0.103, 0.100, 0.098)


def rounds(offset=0.0, alternate=0.0):
    return [t + offset + (alternate if i % 2 else -alternate) for i, t in enumerate(ROUNDS)]


def c03_measure(rms=-0.005, ln=0.0, identity=-0.02, alternate=0.0, ln_params=2):
    """Step times: LayerNorm ROUNDS + ln, RMSNorm + rms (+- alternate by round), identity + identity."""
    def fn(measure, tags):
        if measure == "norm_params":
            return {"d_model": 128, "per_norm": {
                "rmsnorm": {f"layer_{i}/{n}": 128 for i in range(4) for n in ("attn_norm", "mlp_norm")},
                "layernorm": {f"layer_{i}/{n}": ln_params * 128 for i in range(4) for n in ("attn_norm", "mlp_norm")}}}
        times = {"rmsnorm": rounds(rms, alternate), "layernorm": rounds(ln), "identity": rounds(identity)}
        return {"rounds_s": times, "median_s": {k: sorted(v)[3] for k, v in times.items()}}
    return fn


def test_claim3_a_norm_params():
    same = lr_curve()
    assert judged("c03", same, c03_measure())[0] == "pass"
    assert judged("c03", same, c03_measure(ln_params=1))[0] == "fail"


def test_claim3_a_measures_the_params_tree():
    module = runner.module_of(runner.load("c03"))
    p = module.norm_params(protocol.config(protocol.model_s(), lr=3e-3, seed=0))
    assert set(p["per_norm"]["rmsnorm"].values()) == {128} and set(p["per_norm"]["layernorm"].values()) == {256}
    assert len(p["per_norm"]["rmsnorm"]) == 2 * 4 + 1  # every layer's two norms and the final one


def test_claim3_b_step_time():
    same = lr_curve()
    assert judged("c03", same, c03_measure(rms=-0.005))[1] == "pass"
    assert judged("c03", same, c03_measure(rms=+0.005))[1] == "fail"
    assert judged("c03", same, c03_measure(rms=0.0, alternate=0.004))[1] == "inconclusive"


def test_claim3_c_runtime_share():
    same = lr_curve()
    # shares ~15% and ~20% against FLOP shares ~0.2% and ~0.3%
    assert judged("c03", same, c03_measure(rms=-0.005, identity=-0.02))[2] == "pass"
    # identity only 0.5 ms faster: ~0.5% and ~1% < 10x the FLOP shares
    assert judged("c03", same, c03_measure(rms=-0.0005, identity=-0.001))[2] == "fail"
    module = runner.module_of(runner.load("c03"))
    timed = module.arm_configs(protocol.config(protocol.model_s(), lr=3e-3, seed=0))
    assert {a: c.model.norm for a, c in timed.items()} == {"rmsnorm": "rmsnorm", "layernorm": "layernorm",
                                                           "identity": "none"}  # all three in one process
    s = protocol.model_s()
    share = module.flop_share(s, "rmsnorm", 128)
    assert 0.001 < share < 0.003 and module.flop_share(s, "layernorm", 128) == pytest.approx(7 / 4 * share, rel=0.01)


def test_claim3_d_quality():
    same = lr_curve()
    assert judged("c03", same, c03_measure())[3] == "pass"
    worse = lr_curve(shift=0.2)
    assert judged("c03", by_arm(rmsnorm=worse, layernorm=same), c03_measure())[3] == "fail"
    wide = lr_curve(pattern=WIDE)
    assert judged("c03", by_arm(rmsnorm=wide, layernorm=same), c03_measure())[3] == "inconclusive"


def test_claim3_missing_runs_are_not_judged():
    out = judged("c03", lambda t: lr_curve()(t) if t["arm"] == "rmsnorm" else None, lambda m, t: None)
    assert out == [None, None, None, None]


# ---------------------------------------------------------------- claim 4


def test_claim4_criteria():
    same = lr_curve()
    assert judged("c04", same) == ["pass", "pass"]
    steep = lr_curve(depth=2.0, shift=0.2)  # 0.2 nats worse at the best LR, twice as LR-sensitive
    assert judged("c04", by_arm(no_bias=steep, with_bias=same)) == ["fail", "fail"]
    wobbly = lr_curve(depth={0: 1.3, 1: 0.7, 2: 1.35, 3: 0.75}, pattern=WIDE)
    assert judged("c04", by_arm(no_bias=wobbly, with_bias=same)) == ["inconclusive", "inconclusive"]


def test_claim4_missing_runs_are_not_judged():
    assert judged("c04", lambda t: lr_curve()(t) if t["arm"] == "no_bias" else None) == [None, None]


# ---------------------------------------------------------------- claims 5 and 6: at the baseline's best LR


@pytest.fixture
def best_lr(monkeypatch):
    """The baseline's best LR as if S's runs were recorded: 1e-2."""
    monkeypatch.setattr(protocol, "baseline_best_lr", lambda scale: 1e-2)
    return 1e-2


@pytest.fixture
def no_best_lr(monkeypatch):
    monkeypatch.setattr(protocol, "baseline_best_lr", lambda scale: None)


def c05_train(gated=-0.05, swiglu=None, pattern=SMALL):
    """plain arms 3.0; gated arms 3.0 + gated (+ per-seed pattern); swiglu its own offset when given."""
    def fn(tags):
        if tags["arm"] == "baseline":
            return lr_curve(best_lr=1e-2)(tags)
        if not tags["gated"]:
            return train(3.0 + seed_noise(tags))
        offset = swiglu if tags["arm"] == "swiglu" and swiglu is not None else gated
        return train(3.0 + offset + seed_noise(tags, pattern))
    return fn


def test_claim5_runs_at_the_baseline_best_lr(best_lr):
    specs = [s for s in runner.grid(runner.load("c05")) if s.tags["arm"] != "baseline"]
    assert len(specs) == 7 * 4
    assert {s.tags["lr"] for s in specs} == {s.config.train.lr for s in specs} == {best_lr}


def test_claim5_a_matched_params(best_lr, monkeypatch):
    assert judged("c05", c05_train())[0] == "pass"
    module = runner.module_of(runner.load("c05"))
    # the gated arms at S's default d_ff (8/3 d rounded up to 384): 6% more parameters than the plain ones
    monkeypatch.setattr(module, "model", lambda act: protocol.model_s(activation=act, d_ff=None if act in module.PLAIN
                                                                      else 384))
    assert judged("c05", c05_train())[0] == "fail"


def test_claim5_b_and_c(best_lr):
    assert judged("c05", c05_train(gated=-0.05)) == ["pass", "pass", "pass"]
    assert judged("c05", c05_train(gated=+0.05)) == ["pass", "fail", "fail"]
    assert judged("c05", c05_train(gated=-0.05, swiglu=+0.05))[1] == "fail"  # (c) still passes on the mean
    assert judged("c05", c05_train(gated=0.0, pattern=WIDE)) == ["pass", "inconclusive", "inconclusive"]


def test_claim5_missing_runs_are_not_judged(best_lr):
    assert judged("c05", lambda t: c05_train()(t) if t["arm"] != "relu" else None)[1:] == [None, None]


def test_claim5_waits_for_the_baseline_best_lr(no_best_lr):
    claim, res = results("c05", lr_curve())
    assert {s.tags["arm"] for s in res.specs} == {"baseline"} and res.complete
    assert outcomes(claim, res) == [None, None, None]


def c06_train(cost=0.03, pattern=SMALL):
    """serial = S at 1e-2 (3.0; S is far worse at the other LRs); parallel = 3.0 + cost (+ per-seed pattern)."""
    def fn(tags):
        if tags["arm"] == "baseline":
            return train((3.0 if tags["lr"] == 1e-2 else 5.0) + seed_noise(tags))
        return train(3.0 + cost + seed_noise(tags, pattern))
    return fn


def c06_measure(parallel=-0.01, alternate=0.0):
    return lambda measure, tags: {"rounds_s": {"serial": rounds(), "parallel": rounds(parallel, alternate)}}


def test_claim6_a_quality_at_the_baseline_best_lr(best_lr):
    assert judged("c06", c06_train(cost=0.03), c06_measure())[0] == "pass"  # 1% worse, margin 2%
    assert judged("c06", c06_train(cost=0.1), c06_measure())[0] == "fail"  # 3.3% worse
    assert judged("c06", c06_train(cost=0.06, pattern=WIDE), c06_measure())[0] == "inconclusive"
    specs = [s for s in runner.grid(runner.load("c06")) if s.tags["arm"] == "parallel"]
    assert {s.config.train.lr for s in specs} == {best_lr} and len(specs) == 4


def test_claim6_b_step_time(best_lr):
    assert judged("c06", c06_train(), c06_measure(parallel=-0.01))[1] == "pass"
    assert judged("c06", c06_train(), c06_measure(parallel=+0.01))[1] == "fail"
    assert judged("c06", c06_train(), c06_measure(parallel=0.0, alternate=0.004))[1] == "inconclusive"
    claim, res = results("c06", c06_train(), c06_measure(parallel=-0.01))
    assert "speed-up 1.11" in claim.criteria(res)[1].detail


def test_claim6_missing_runs_are_not_judged(no_best_lr):
    claim, res = results("c06", lr_curve(), lambda m, t: None)
    assert outcomes(claim, res) == [None, None]
