"""Claims 9-12: each criterion judged on synthetic records where the answer is known (pass, fail,
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


# ---------------------------------------------------------------- claims 2, 11, 12 (LR grids)


def lr_curve(best_lr, depth=1.0, diverge_above=None, shift=0.0):
    """A U-shaped loss over log LR, diverging above `diverge_above`."""
    def loss(tags):
        lr = tags["lr"]
        if diverge_above is not None and lr > diverge_above:
            return train(0.0, diverged=True)
        return train(3.0 + shift + depth * abs(math.log10(lr / best_lr)) + noise(tags))
    return loss


def test_claim11_criteria():
    off = lr_curve(3e-3, 1.0, diverge_above=3e-2)

    def flat(tags, shift=0.0):  # as `off` up to 3e-3, then flat instead of diverging
        return off(tags) if tags["lr"] <= 3e-3 and not shift else train(3.0 + shift + noise(tags))

    def fn(tags, on=flat, big=500.0):
        r = (on if tags["arm"] == "per_head" else off)(tags)
        if "probe" in r:
            r["probe"]["max_attn_logit"] = 5.0 if tags["arm"] == "per_head" else big
        else:  # diverged: the last logged logit is what (b) reads
            r["history"] = [{"step": 10, "max_attn_logit": big}]
        return r
    claim, res = results("c11", fn)
    assert passed(claim, res) == [True, True, True]
    claim, res = results("c11", lambda t: fn(t, big=20.0))
    assert passed(claim, res) == [True, False, True]
    claim, res = results("c11", lambda t: fn(t, on=lambda tags: flat(tags, shift=0.3)))
    assert passed(claim, res)[2] is False


def test_claim12_criteria():
    none, caps = lr_curve(3e-3, 1.0, diverge_above=3e-2), lr_curve(3e-3, 0.8)

    def fn(tags, capped=4.9, out=9.9):
        r = (none if tags["arm"] == "none" else caps)(tags)
        if tags["arm"] == "caps_5_10":
            r["probe"].update(max_attn_logit_capped=capped, max_abs_logit=out)
        return r
    claim, res = results("c12", fn)
    assert passed(claim, res) == [True, True, True]
    claim, res = results("c12", lambda t: fn(t, out=10.5))
    assert passed(claim, res)[0] is False


# ---------------------------------------------------------------- claims 9, 10


def test_claim9_criteria():
    def fn(tags, mid_adv=0.0, end_adv=0.05, gap=0.0):
        wd = tags["wd"]
        end = 3.0 - (end_adv if wd == 0.1 else 0.0) + noise(tags)
        mid = 3.5 - (mid_adv if wd == 0.1 else 0.0)
        hist = [{"step": 150, "val_loss": mid}, {"step": 300, "val_loss": end}]
        return train(end, tail=end + (gap if wd == 0.3 else 0.0), history=hist)
    claim, res = results("c09", fn)
    assert passed(claim, res) == [True, True, True]
    claim, res = results("c09", lambda t: fn(t, mid_adv=0.05, gap=0.05))
    assert passed(claim, res) == [False, True, False]
    claim, res = results("c09", lambda t: fn(t, end_adv=0.0))
    assert passed(claim, res) == [True, False, False]


def test_claim10_criteria():
    def fn(tags, off_logz=8.0, on_logz=0.3):
        on = tags["arm"] == "z_loss=1e-4"
        return train(3.0 + noise(tags), logz=on_logz if on else off_logz)
    claim, res = results("c10", fn)
    assert passed(claim, res) == [True, True]
    claim, res = results("c10", lambda t: fn(t, off_logz=2.0, on_logz=1.5))
    assert passed(claim, res) == [False, False]
    # without z-loss at LR 0.1 a diverged run counts for (b)
    claim, res = results("c10", lambda t: train(0, diverged=True) if t["arm"] == "z_loss=off" and t["lr"] == 0.1
                         else fn(t, off_logz=2.0))
    assert passed(claim, res) == [True, True]
    assert runner.grid(runner.load("c10"))[0].config.train.steps == 600


