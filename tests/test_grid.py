"""Config arithmetic: dotted replace, config_diff, grid and run names."""

import pytest

from lecture3.config import Config, ConfigError, ModelConfig, RopeScaling, dotted_keys
from lecture3.grid import config_diff, flatten, grid, run_name


def test_dotted_replace_changes_exactly_the_named_fields():
    base = Config()
    cfg = base.replace(**{"model.norm_position": "post", "train.lr": 1e-3, "data.seq_len": 64})
    assert (cfg.model.norm_position, cfg.train.lr, cfg.data.seq_len) == ("post", 1e-3, 64)
    assert config_diff(base, cfg) == {"data.seq_len": (128, 64), "model.norm_position": ("pre", "post"),
                                      "train.lr": (3e-3, 1e-3)}
    assert base.model.norm_position == "pre"  # frozen: the original is untouched


def test_replace_takes_whole_sections_and_validates():
    cfg = Config().replace(model=ModelConfig(d_model=64, n_heads=2))
    assert cfg.model.d_model == 64
    with pytest.raises(ValueError, match="ModelConfig.norm_position='middle' is invalid"):
        Config().replace(**{"model.norm_position": "middle"})
    with pytest.raises(ValueError, match="seq_len"):  # the cross-section check of Config runs too
        Config().replace(**{"model.position": "learned", "model.max_seq_len": 64})


@pytest.mark.parametrize("key, expected", [
    ("model.norm_postion", "'model.norm_position'"),
    ("train.learning_rate", "Config has no key 'train.learning_rate'"),
    ("modle.d_model", "'model.d_model'"),
    ("lr", "'train.lr'"),
])
def test_unknown_dotted_key_is_one_line_naming_close_matches(key, expected):
    with pytest.raises(ConfigError) as e:
        Config().replace(**{key: 1})
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_config_diff_is_empty_for_equal_configs_and_sees_nested_fields():
    a = Config().replace(**{"model.position": "rope"})
    assert config_diff(Config(), a) == {}
    b = a.replace(**{"model.rope_scaling": RopeScaling(factor=8.0, original_max_position=256)})
    diff = config_diff(a, b)
    assert list(diff) == ["model.rope_scaling"] and diff["model.rope_scaling"][1]["factor"] == 8.0
    assert config_diff(a.to_dict(), b.to_dict()) == diff  # dicts (a saved config.json) work the same
    assert flatten(a)["model.layer_pattern"] == ["global"]


def test_config_diff_nested_compares_the_fields_of_nested_dataclasses():
    a = Config().replace(**{"model.position": "rope",
                            "model.rope_scaling": RopeScaling(factor=8.0, original_max_position=256)})
    b = a.replace(**{"model.rope_scaling": RopeScaling(factor=4.0, original_max_position=256), "train.lr": 1e-3})
    assert list(config_diff(a, b)) == ["model.rope_scaling", "train.lr"]  # the dataclass is one value
    assert config_diff(a, b, nested=True) == {"model.rope_scaling.factor": (8.0, 4.0), "train.lr": (3e-3, 1e-3)}
    assert config_diff(Config(), a, nested=True)["model.rope_scaling"][0] is None  # None vs a dataclass: one value
    saved = a.to_dict()
    del saved["train"]["lr"]  # a config.json of an older version, without the field
    assert config_diff(saved, a, nested=True) == {"train.lr": ("<absent>", 3e-3)}


def test_grid_is_the_full_product_with_unique_stable_names():
    base = Config()
    axes = {"model.norm": ["rmsnorm", "layernorm"], "model.norm_position": ["pre", "post", "sandwich"],
            "train.lr": [1e-3, 3e-3], "train.seed": [0, 1]}
    configs = grid(base, axes)
    assert len(configs) == 2 * 3 * 2 * 2
    combos = {(c.model.norm, c.model.norm_position, c.train.lr, c.train.seed) for c in configs}
    assert len(combos) == len(configs)
    names = [run_name(c, base, keys=list(axes)) for c in configs]
    assert len(set(names)) == len(names)
    assert names[0] == "norm=rmsnorm,norm_position=pre,lr=0.001,train.seed=0"
    assert names == [run_name(c, base, keys=list(axes)) for c in grid(base, axes)]  # stable
    assert run_name(base) == "base"
    assert run_name(base.replace(**{"train.lr": 1e-2})) == "lr=0.01"


def test_grid_errors_come_before_any_config():
    with pytest.raises(ConfigError, match="did you mean 'model.norm_position'"):
        grid(Config(), {"model.norm_positon": ["pre"]})
    with pytest.raises(ConfigError, match="non-empty list"):
        grid(Config(), {"train.lr": 1e-3})
    with pytest.raises(ConfigError, match="repeats a value"):
        grid(Config(), {"train.lr": [1e-3, 1e-3]})


def test_shared_field_names_keep_their_section():
    assert {"data.seed", "train.seed"} <= set(dotted_keys(Config()))  # `seed` is in two sections
    cfg = Config().replace(**{"data.seed": 5, "train.seed": 7})
    assert run_name(cfg) == "data.seed=5,train.seed=7"
