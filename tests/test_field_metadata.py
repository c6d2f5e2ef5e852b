"""Each config field is described once (config.option: kind, help; choices in its Literal type),
and what other modules used to list by hand is derived from that description."""

import dataclasses

import pytest

from lecture3.config import (
    KINDS,
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    choices,
    config_sections,
    fields_of_kind,
    literal_fields,
)
from lecture3.experiment import spec
from lecture3.flags import ArgumentParser, add_dataclass_flags
from lecture3.hf.families import RUNTIME_FIELDS


@pytest.mark.parametrize("section", list(config_sections()))
def test_every_field_of_every_section_is_described(section):
    cls = config_sections()[section]
    for f in dataclasses.fields(cls):
        assert f.metadata.get("kind") in KINDS, f"{cls.__name__}.{f.name}: describe it with arch/impl/training"
        assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help"


def test_runtime_fields_are_the_fields_that_are_not_architecture():
    assert set(RUNTIME_FIELDS) == {"init_std", "embed_dropout", "resid_dropout", "attn_dropout", "param_dtype",
                                   "dtype", "scan_layers", "remat", "document_mask", "attention_impl",
                                   "attention_chunk"}  # the hand-kept tuple of 297096c
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(RUNTIME_FIELDS) == names - set(fields_of_kind(ModelConfig, "architecture"))


def test_a_field_added_to_a_config_keeps_every_run_key_at_its_default():
    """A new option (here a boolean architecture field, off by default) leaves every key alone while off, and is
    in the key when on: the committed records stay the runs they are."""
    from lecture3.config import Config, arch
    from lecture3.experiment import protocol

    @dataclasses.dataclass(frozen=True)
    class WithOption(ModelConfig):
        branch_scale: bool = arch(False, "a new option")

    base = protocol.config(protocol.model_s(), lr=1e-3, seed=0)
    plus = Config(**{**{f.name: getattr(base, f.name) for f in dataclasses.fields(Config)},
                     "model": WithOption(**dataclasses.asdict(base.model))})
    assert "branch_scale" in plus.to_dict()["model"]
    assert spec.RunSpec(plus, tags={}).key == spec.RunSpec(base, tags={}).key
    on = dataclasses.replace(plus, model=dataclasses.replace(plus.model, branch_scale=True))
    assert spec.RunSpec(on, tags={}).key != spec.RunSpec(base, tags={}).key
    assert spec.key_config(on)["model"]["branch_scale"] is True


def test_the_fields_added_since_the_keys_were_defined_keep_their_defaults():
    """Every record's key depends on these values: changing a default here orphans the committed records."""
    pinned = {("model", "attention_impl"): "dense", ("model", "attention_chunk"): 512, ("train", "loss_chunk"): None}
    assert spec.added_fields(Config()).items() >= pinned.items()  # a field added later joins them


@pytest.mark.parametrize("name", literal_fields(ModelConfig))
def test_every_literal_field_is_validated_at_construction(name):
    """No hand-typed tuple: a Literal-typed field, new or old, rejects a value outside its choices."""
    allowed = [v for v in choices(ModelConfig, name) if v is not None]
    with pytest.raises(ConfigError, match=rf"^ModelConfig\.{name}='bogus' is invalid: expected one of "
                                          + ", ".join(repr(v) for v in allowed)):
        ModelConfig(**{name: "bogus"})


def test_literal_fields_are_found_from_the_types():
    assert {"norm", "position", "qk_norm", "remat", "attention_impl", "dtype"} <= set(literal_fields(ModelConfig))
    assert "layer_pattern" not in literal_fields(ModelConfig)  # a tuple of choices, checked on its own
    assert choices(ModelConfig, "qk_norm") == ("per_head", "full", None)
    assert set(literal_fields(TrainConfig)) == {"schedule", "weight_decay_mode", "on_nonfinite"}
    with pytest.raises(ValueError, match=r"TrainConfig\.on_nonfinite='x' is invalid: expected one of \('stop'"):
        TrainConfig(on_nonfinite="x")


def test_flag_help_is_the_fields_help():
    parser = ArgumentParser()
    for section, cls in config_sections().items():
        add_dataclass_flags(parser, section, cls, defaults=getattr(Config(), section))
    actions = {a.dest: a for a in parser._actions}
    for section, cls in config_sections().items():
        for f in dataclasses.fields(cls):
            assert actions[f"{section}.{f.name}"].help.startswith(f.metadata["help"].replace("%", "%%"))
    assert "[implementation only" in actions["model.attention_impl"].help
    assert "[implementation only" not in actions["model.norm"].help


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ModelConfig) if f.type in ("int", "int | None")])
def test_every_int_field_is_checked_from_its_type(name):
    """No hand-typed tuple of sizes: a new `int` field is a positive integer (`int | None`: or None) too."""
    optional = ModelConfig.__dataclass_fields__[name].type == "int | None"
    allowed = "a positive integer" + (" or None" if optional else "")
    with pytest.raises(ConfigError, match=rf"^ModelConfig\.{name}=0 is invalid: expected {allowed}$"):
        ModelConfig(**{name: 0})
