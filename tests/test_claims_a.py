"""Claims 1-6: each criterion judged on synthetic records where the answer is known (pass, fail,
diverged runs), and each claim's grid as the protocol sizes it."""

import math

import pytest

from lecture3.experiment import report, runner
from lecture3.experiment.spec import Results

LN_V = math.log(2048)


def train(loss, *, diverged=False, logz=0.5, attn=5.0, capped=None, out_logit=5.0, tail=None, history=None,
          params=100_000):
    res = {"final_loss": LN_V if diverged else loss, "final_val_loss": None if diverged else loss,
           "diverged": diverged, "initial_loss": LN_V, "train_loss_tail": tail, "history": history or [],
           "params": params, "tokens": 614_400}
    if not diverged:
        res["probe"] = {"max_attn_logit": attn, "max_attn_logit_capped": attn if capped is None else capped,
                        "log_z_abs": logz, "max_abs_logit": out_logit}
    return res


def results(claim_name, train_fn, measure_fn=None):
    claim = runner.load(claim_name)
    specs = runner.grid(claim)
    recs = {}
    for s in specs:
        res = train_fn(s.tags) if s.measure == "train" else measure_fn(s.measure, s.tags)
        if res is not None:
            recs[s.key] = {"result": res}
    return claim, Results(specs, recs)


def passed(claim, res):
    return [c.passed for c in claim.criteria(res)]


def noise(tags):
    return 0.001 * tags.get("seed", 0)


# ---------------------------------------------------------------- claim 1


def c01_measure(per_layer_post):
    def fn(measure, tags):
        layers = per_layer_post if tags["arm"] == "post" else [0.2] * 6
        return {"per_layer": layers, "per_batch": [layers]}
    return fn


def c01_train(post_gap_cold, post_gap_warm, diverge_post=False):
    def fn(tags):
        base = 3.0 + noise(tags)
        if tags["arm"] == "pre":
            return train(base)
        gap = post_gap_cold if tags["warmup"] == 0.0 and tags["lr"] >= 3e-3 else post_gap_warm
        if diverge_post and tags["warmup"] == 0.0 and tags["lr"] == 1e-2:
            return train(0.0, diverged=True)
        return train(base + gap)
    return fn


def test_claim1_criteria():
    claim, res = results("c01", c01_train(0.2, 0.02), c01_measure([0.1, 0.15, 0.2, 0.3, 0.4, 0.5]))
    assert passed(claim, res) == [True, True, True]
    assert report.verdict_of(claim, res) == "reproduced"
    claim, res = results("c01", c01_train(0.05, 0.02), c01_measure([0.2] * 6))
    assert passed(claim, res) == [False, False, True]
    # a diverged post run counts as a hit for (b); warmup closing no gap fails (c)
    claim, res = results("c01", c01_train(0.2, 0.3, diverge_post=True), c01_measure([0.1] * 5 + [0.5]))
    assert passed(claim, res) == [True, True, False]


def test_claim1_missing_runs_are_not_judged():
    only_pre = c01_measure([0.1] * 6)
    claim, res = results("c01", lambda tags: train(3.0) if tags["arm"] == "pre" else None,
                         lambda m, tags: only_pre(m, tags) if tags["arm"] == "pre" else None)
    assert passed(claim, res) == [None, None, None]
    assert report.verdict_of(claim, res).startswith("incomplete")


def test_claim1_grid_is_the_protocol():
    claim = runner.load("c01")
    specs = runner.grid(claim)
    assert sum(s.measure == "train" for s in specs) == 3 * 2 * 2 * 3
    assert all(s.config.model.n_layers == 6 for s in specs)
    assert {s.config.train.warmup_steps for s in specs if s.measure == "train"} == {0, 15}


# ---------------------------------------------------------------- claims 2, 11, 12 (LR grids)


def lr_curve(best_lr, depth=1.0, diverge_above=None, shift=0.0):
    """A U-shaped loss over log LR, diverging above `diverge_above`."""
    def loss(tags):
        lr = tags["lr"]
        if diverge_above is not None and lr > diverge_above:
            return train(0.0, diverged=True)
        return train(3.0 + shift + depth * abs(math.log10(lr / best_lr)) + noise(tags))
    return loss


def test_claim2_criteria():
    pre, sand = lr_curve(3e-3, 1.0, diverge_above=1e-2), lr_curve(3e-3, 0.5, diverge_above=3e-2)
    claim, res = results("c02", lambda t: (sand if t["arm"] == "sandwich" else pre)(t))
    assert passed(claim, res) == [True, True, True]
    claim, res = results("c02", lambda t: (pre if t["arm"] == "sandwich" else sand)(t))
    assert passed(claim, res) == [False, False, True]
    worse = lr_curve(3e-3, 0.5, diverge_above=3e-2, shift=0.2)
    claim, res = results("c02", lambda t: (worse if t["arm"] == "sandwich" else pre)(t))
    assert passed(claim, res)[2] is False


# ---------------------------------------------------------------- claims 3, 4, 5, 6


def timing(times, params=None):
    def fn(measure, tags):
        out = {"median_s": times, "rounds_s": {k: [v] * 7 for k, v in times.items()}, "rounds": 7,
               "steps_per_round": 10}
        if measure == "norm_timing":
            out["norm_params"] = params or {"rmsnorm": {"attn_norm": 128, "d_model": 128},
                                            "layernorm": {"attn_norm": 256, "d_model": 128}}
            out["flop_share"] = {"rmsnorm": 0.001, "layernorm": 0.002}
        return out
    return fn


def test_claim3_criteria():
    same = lr_curve(3e-3)
    claim, res = results("c03", same, timing({"rmsnorm": 0.10, "layernorm": 0.11, "identity": 0.08}))
    assert passed(claim, res) == [True, True, True, True]
    # slower RMSNorm; a 2% norm share is < 10x a 0.2% FLOP share
    claim, res = results("c03", same, timing({"rmsnorm": 0.10, "layernorm": 0.099, "identity": 0.098}))
    assert passed(claim, res) == [True, False, False, True]
    worse = lr_curve(3e-3, shift=0.1)
    claim, res = results("c03", lambda t: (worse if t["arm"] == "rmsnorm" else same)(t),
                         timing({"rmsnorm": 0.10, "layernorm": 0.11, "identity": 0.08}))
    assert passed(claim, res)[3] is False


def test_claim4_criteria():
    claim, res = results("c04", lr_curve(3e-3))
    assert passed(claim, res) == [True, True]
    claim, res = results("c04", lambda t: lr_curve(3e-3, 2.0 if t["arm"] == "no_bias" else 1.0,
                                                   shift=0.2 if t["arm"] == "no_bias" else 0.0)(t))
    assert passed(claim, res) == [False, False]


def test_claim5_criteria_and_matched_params():
    from lecture3 import accounting

    counts = {s.tags["arm"]: accounting.param_counts(s.config.model)["total"] for s in runner.grid(runner.load("c05"))}
    assert (max(counts.values()) - min(counts.values())) / min(counts.values()) < 0.01

    def fn(tags, gain=0.05):
        return train(3.0 - (gain if tags["gated"] else 0.0) + noise(tags), params=counts[tags["arm"]])
    claim, res = results("c05", fn)
    assert passed(claim, res) == [True, True, True]
    claim, res = results("c05", lambda t: fn(t, gain=0.0))
    assert passed(claim, res) == [True, False, False]


def test_claim6_criteria():
    def fn(tags, cost=0.03):
        return train(3.0 + (cost if tags["arm"] == "parallel" else 0.0) + noise(tags))
    claim, res = results("c06", fn, timing({"serial": 0.10, "parallel": 0.09}))
    assert passed(claim, res) == [True, True]  # 0.03 / 3.0 = 1% relative
    claim, res = results("c06", lambda t: fn(t, cost=0.1), timing({"serial": 0.10, "parallel": 0.11}))
    assert passed(claim, res) == [False, False]


@pytest.mark.parametrize("name", [p.stem for p in runner.claim_files()])
def test_every_claim_has_three_seeds_and_unique_runs(name):
    claim = runner.load(name)
    specs = runner.grid(claim)
    assert len({s.key for s in specs}) == len(specs)
    for s in specs:
        if s.measure == "train":
            assert s.config.train.steps >= 300
            assert s.config.train.steps * s.config.train.batch_size * s.config.data.seq_len >= 500_000
    arms = {}
    for s in specs:
        if s.measure == "train":
            arms.setdefault(tuple((k, v) for k, v in s.tags.items() if k != "seed"), set()).add(s.tags["seed"])
    assert arms and all(len(seeds) >= 3 for seeds in arms.values())
