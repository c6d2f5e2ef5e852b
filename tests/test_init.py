"""The package's public names: every name of `__all__` resolves, on first use, and the command line's
help, the configs and the config arithmetic load no jax."""

import subprocess
import sys
import textwrap

import pytest

HEAVY = ("jax", "jaxlib", "flax", "grain", "tensorflow_datasets")


def _fresh(code: str) -> str:
    """stdout of `code` in a fresh interpreter (nothing this test process has imported is there)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, capture_output=True,
                         text=True, timeout=300)
    return out.stdout


@pytest.mark.parametrize("argv", [["data", "--help"], ["train", "--help"], ["generate", "--help"], ["--help"]])
def test_help_does_not_import_jax(argv):
    out = _fresh(f"""
        import sys
        from lecture3 import cli
        try:
            cli.main({argv!r})
        except SystemExit as e:
            assert e.code == 0, e.code
        print(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))
        """).splitlines()
    assert "usage: lecture3" in out[0] and out[-1] == "[]", out[-1]


def test_configs_and_config_arithmetic_do_not_import_jax():
    out = _fresh("""
        import sys
        import lecture3
        from lecture3.data import DataConfig, DataError

        cfg = lecture3.Config().replace(**{"train.loss": "cross_entropy+z_loss:1e-4", "train.lr": 1e-3})
        assert list(lecture3.config_diff(lecture3.Config(), cfg)) == ["train.lr", "train.loss"]
        assert lecture3.grid(cfg, {"train.seed": [0, 1]})[1].train.seed == 1
        try:
            lecture3.TrainConfig(loss="cross_entropy+zloss")  # the spec is still checked
        except lecture3.Lecture3Error as e:
            print(e)
        print("jax" in sys.modules)
        """).splitlines()
    assert "did you mean 'z_loss'" in out[0] and out[-1] == "False"


def test_every_public_name_resolves_and_dir_lists_it():
    out = _fresh("""
        import types
        import lecture3
        import lecture3.data

        for pkg in (lecture3, lecture3.data):
            assert set(pkg.__all__) <= set(dir(pkg)), set(pkg.__all__) - set(dir(pkg))
            assert all(getattr(pkg, name) is not None for name in pkg.__all__)
        import lecture3.grid  # the submodule does not hide the function of the same name
        import lecture3.loop
        from lecture3 import Transformer, losses, presets, train

        assert isinstance(lecture3.grid, types.FunctionType) and train is lecture3.loop.train
        assert losses.parse("cross_entropy") and losses.LossSpecError is lecture3.loss_spec.LossSpecError
        assert isinstance(lecture3.hf, types.ModuleType) and lecture3.generate.__module__ == "lecture3.decoding"
        try:
            lecture3.trian
        except AttributeError as e:
            print(e)
        """)
    assert out.strip() == "module 'lecture3' has no attribute 'trian'"


def test_the_lazy_names_are_the_ones_the_modules_define():
    import lecture3
    import lecture3.data

    for pkg in (lecture3, lecture3.data):
        assert len(set(pkg.__all__)) == len(pkg.__all__)
        for name in pkg.__all__:
            value = getattr(pkg, name)
            assert getattr(value, "__name__", name).rpartition(".")[2] == name, (pkg.__name__, name)
