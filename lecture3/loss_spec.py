"""The grammar of a loss spec (`"cross_entropy+z_loss:1e-4+max_attn_logit:1e-3,30"`), without jax.

`TrainConfig` checks its `loss` here, so validating a config (and `lecture3 --help`) needs no jax; the
terms themselves are in `lecture3.losses`, whose `TERMS` pairs each name below with its factory.
"""

from __future__ import annotations

import difflib

from lecture3.errors import Lecture3Error

# name -> the names of its numeric arguments, in the order a spec gives them
TERM_ARGS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("label_smoothing",),
    "z_loss": ("weight",),
    "logit_l2": ("weight",),
    "max_attn_logit": ("weight", "threshold"),
    "attn_entropy_floor": ("weight", "floor"),
}


class LossSpecError(Lecture3Error):
    """A loss specification naming an unknown term or giving it bad arguments."""


def spec_help() -> str:
    """The terms and their arguments, as a spec writes them: `cross_entropy[:label_smoothing], ...`."""
    return ", ".join(f"{n}[:{','.join(a)}]" for n, a in TERM_ARGS.items())


def parse_terms(spec: str) -> dict[str, tuple[float, ...]]:
    """The `{name: args}` of a spec, validated (one line naming what is wrong), before anything is built.
    Each `+`-separated term is `name` or `name:a,b` with the term's numeric arguments in the order of
    `TERM_ARGS` (cross_entropy's one argument is its label smoothing; every other term's first is its weight)."""
    if not isinstance(spec, str) or not spec.strip():
        raise LossSpecError(f"loss spec {spec!r} is empty: expected e.g. 'cross_entropy+z_loss:1e-4'")
    out: dict[str, tuple[float, ...]] = {}
    for item in spec.replace(" ", "").split("+"):
        name, _, rest = item.partition(":")
        if name not in TERM_ARGS:
            close = difflib.get_close_matches(name, list(TERM_ARGS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise LossSpecError(f"unknown loss term {name!r} in {spec!r}: {hint}expected one of {spec_help()}")
        if name in out:
            raise LossSpecError(f"loss term {name!r} appears twice in {spec!r}; give it once")
        arg_names = TERM_ARGS[name]
        raw = rest.split(",") if rest else []
        if len(raw) > len(arg_names):
            raise LossSpecError(f"loss term {item!r} takes at most {len(arg_names)} argument(s) "
                                f"({', '.join(arg_names)}), got {len(raw)}")
        try:
            out[name] = tuple(float(a) for a in raw)
        except ValueError:
            raise LossSpecError(f"loss term {item!r}: arguments must be numbers ({', '.join(arg_names)})") from None
    if "cross_entropy" not in out:
        raise LossSpecError(f"loss spec {spec!r} has no cross_entropy term: the model would not learn the data; "
                            "start it with 'cross_entropy+...'")
    return out
