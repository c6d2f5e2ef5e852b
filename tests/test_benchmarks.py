"""benchmarks/gpu_mfu.py, compile_time.py and long_context.py run end to end at CPU size and print what they promise.

No timing is asserted (timings belong in the benchmarks' output): the scripts must exit 0, print a row per
attention impl / per (depth, scan) with tokens/s, an MFU field and the compile ratios, train (the loss of
lecture3's step goes down), and pick the published peak of a known device and none for a CPU or an
unknown one.
"""

import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import types

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
HAS_IMPL = True  # ModelConfig.attention_impl exists (tests/test_model.py checks every field)


def _load(name: str):
    """benchmarks/<name>.py as a module, with benchmarks/ on sys.path (where a script finds its siblings)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass in the script looks its module up there
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_gpu_mfu_tiny_on_cpu(tmp_path):
    impls = ["dense", "chunked"] if HAS_IMPL else ["dense"]
    out_json = tmp_path / "mfu.json"
    # float32 compute: bf16 matmuls are emulated on a CPU and compile slower; the step is the same code
    out = _run("gpu_mfu.py", "--size", "tiny", "--steps", "3", "--warmup", "1", "--dtype", "float32",
               "--attention-impl", ",".join(impls), "--json", str(out_json))
    assert re.search(r"attention .*ms/step .*tokens/s .*MFU .*MFU causal", out), out
    assert "peak: n/a: a CPU has no published dense peak" in out
    for impl in impls:  # one table row each: compile s, ms/step, tokens/s, TFLOP/s, then MFU n/a on a CPU
        assert re.search(rf"^{impl} +[\d.]+ +[\d.]+ +\d+ +[\d.]+ +n/a +n/a ", out, re.M), out
    record = json.loads(out_json.read_text())
    assert record["platform"] == "cpu" and record["peak_flops_per_s"] is None
    assert record["params"] > 1e6 and record["training_flops_per_token"] > record["training_flops_per_token_causal"]
    results = record["results"]
    assert [r["attention_impl"] for r in results] == impls
    for r in results:
        assert r["tokens_per_s"] > 0 and r["mfu"] is None and len(r["step_s"]) == 3
        assert r["last_loss"] < r["first_loss"]  # lecture3's step really trains
    assert all(abs(r["last_loss"] - results[0]["last_loss"]) < 1e-3 for r in results)  # same maths


def test_gpu_mfu_rejects_what_the_config_cannot_take(monkeypatch):
    bench = _load("gpu_mfu")
    with pytest.raises(SystemExit, match=r"--attention-impl flash: ModelConfig\.attention_impl='flash' is invalid"):
        bench.main(["--size", "tiny", "--attention-impl", "dense,flash"])
    # an older lecture3 without the field: dense still runs (it is the only attention), others fail clearly
    real = dataclasses.fields
    monkeypatch.setattr(bench, "dataclasses", types.SimpleNamespace(
        fields=lambda cls: tuple(f for f in real(cls) if f.name != "attention_impl")))
    args = types.SimpleNamespace(dtype="bfloat16", qk_norm=None, remat=None, scan=False, seq_len=128)
    with pytest.raises(SystemExit, match="has no field `attention_impl`"):
        bench.model_config("tiny", "cudnn", args)
    assert bench.model_config("tiny", "dense", args).dtype == "bfloat16"


def test_gpu_mfu_peak_table(monkeypatch):
    bench = _load("gpu_mfu")
    peak, note = bench.peak_flops("bfloat16", None)  # the tests run on CPU devices
    assert peak is None and note.startswith("n/a: a CPU")
    assert bench.peak_flops("bfloat16", 100.0)[0] == 100e12
    for kind, tflops in (("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                         ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA B999", None)):
        device = types.SimpleNamespace(device_kind=kind, platform="gpu")
        monkeypatch.setattr(jax, "devices", lambda d=device: [d])
        peak, note = bench.peak_flops("bfloat16", None)
        assert peak == (None if tflops is None else tflops * 1e12), kind
        assert note.startswith("n/a") == (tflops is None), note


@pytest.mark.slow
def test_compile_time_small(tmp_path):
    out_json = tmp_path / "compile.json"
    out = _run("compile_time.py", "--layers", "1,2", "--no-warmup", "--json", str(out_json))
    assert "AOT jitted.lower(abstract state, batch) then .compile()" in out
    for layers in (1, 2):
        for scan in ("False", "True"):
            assert re.search(rf"^ +{layers} +{scan} +[\d.]+ +[\d.]+ +[\d.]+$", out, re.M), out
    assert re.search(r"^ratio 2/1 layers \(lower \+ compile\): unscanned [\d.]+x, scanned [\d.]+x$", out, re.M), out
    record = json.loads(out_json.read_text())
    assert len(record["rows"]) == 4 and all(r["compile_s"] > 0 and r["lower_s"] > 0 for r in record["rows"])
    assert record["ratio"]["layers"] == [1, 2] and record["ratio"]["scanned"] > 0


def test_compile_time_needs_two_depths():
    bench = _load("compile_time")
    with pytest.raises(SystemExit):
        bench.main(["--layers", "4"])
    with pytest.raises(SystemExit):
        bench.main(["--layers", "4,x"])


@pytest.mark.slow
def test_long_context_quick_runs_every_configuration():
    out = _run("long_context.py", "--quick")
    assert len(re.findall(r"s/step .* us/token peak .* GiB", out)) == 4, out
    assert re.search(r"per token: step time [\d.]+x, peak memory [\d.]+x", out), out
    assert re.search(r"chunked / dense: step time [\d.]+x, peak memory [\d.]+x", out), out
    losses = re.findall(r"^(?:dense|chunked).* loss ([\d.]+)$", out, re.M)
    assert len(losses) == 2 and losses[0] == losses[1], out  # the same first step, whichever attention


@pytest.mark.slow
def test_train_step_vs_torch_llama_is_transformers_model_on_the_same_weights(tmp_path, capsys):
    """--model llama: transformers' LlamaForCausalLM, loaded from the folder lecture3.hf.save_pretrained
    wrote from the lecture3 init, gives lecture3's loss at init and over 3 AdamW steps."""
    pytest.importorskip("torch")
    bench = _load("torch_reference")
    cfg = bench.bench_config("llama").model
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (256, 4, 8, 2, 8192)
    folder = str(tmp_path / "hf")
    init, losses = bench.save_params(folder, "llama")
    bench.check_same_model(folder, init, losses, 1, "llama")
    out = capsys.readouterr().out
    assert re.search(r"^  OK: largest \|diff\| [\d.e+-]+ \(tolerance 1e-3\)$", out, re.M), out
    assert losses[-1] < init  # it trains


def test_train_step_vs_torch_variants_do_what_they_say():
    """jax_dp2 splits the batch over a data mesh of 2 host devices; jax (what lecture3 runs on one CPU device)
    takes the batch in two halves, jax_one_pass in one; jax_lean reports the loss only; jax_bf16, jax_scan and
    jax_remat_full set up the model their config field names. Each still trains the same model: the first
    losses equal jax's. On one core (a pinned worker, `taskset -c 0`) lecture3 takes one pass too: there is no
    second core to run a half on."""
    from lecture3 import runtime

    bench = _load("step_variants")
    ref_step, ref_state, batch, (m, tc, _, ref_mesh, _) = bench.jax_setup(bench.VARIANTS["jax"])
    assert bench.batch_splits(bench.VARIANTS["jax"], m, tc, ref_mesh) == (2 if runtime.cpu_cores() >= 2 else 1)
    assert bench.batch_splits(bench.VARIANTS["jax_one_pass"], m, tc, ref_mesh) == 1
    _, ref_metrics = ref_step(ref_state, batch)
    assert "loss" in ref_metrics and len(ref_metrics) > 1
    for name in ("jax_dp2", "jax_one_pass", "jax_lean"):
        step, state, batch, (*_, mesh, _rules) = bench.jax_setup(bench.VARIANTS[name])
        assert mesh.shape["data"] == (2 if name == "jax_dp2" else 1), name
        state, metrics = step(state, batch)
        if name == "jax_dp2":
            assert len(state.params["embed"].sharding.device_set) == 2
        assert (set(metrics) == {"loss"}) == (name == "jax_lean"), name
        assert abs(float(metrics["loss"]) - float(ref_metrics["loss"])) < 1e-5, name
    default = bench.bench_config("default").model
    for name in ("jax_bf16", "jax_scan", "jax_remat_full"):  # set up, not run: the model is another config
        changed = bench.VARIANTS[name].model
        m = bench.jax_setup(bench.VARIANTS[name])[3][0]
        assert {k: getattr(m, k) for k in changed} == changed, name
        assert {k: getattr(default, k) for k in changed} != changed, name


def test_train_step_vs_torch_worker_env_carries_the_variants_xla_flags():
    """Each variant's XLA flags (and its host device count) reach its worker's XLA_FLAGS, after the ones
    already set; a variant without flags leaves XLA_FLAGS as it was."""
    variants, workers = _load("step_variants"), _load("step_workers")
    for name, v in variants.VARIANTS.items():
        flags = workers.worker_env(name, {"XLA_FLAGS": "--before"})["XLA_FLAGS"].split()
        devices = [f"--xla_force_host_platform_device_count={v.devices}"] if v.devices > 1 else []
        assert flags == ["--before", *v.xla_flags.split(), *devices], name
    assert workers.worker_env("jax_onednn", {})["XLA_FLAGS"] == "--xla_cpu_use_onednn=true"
    assert "XLA_FLAGS" not in workers.worker_env("jax", {})


@pytest.mark.parametrize("name,call,precision", [("jax", {"keep_memory": True}, None),
                                                 ("jax_glibc_malloc", {"keep_memory": False}, None),
                                                 ("jax_xla_defaults", None, None),
                                                 ("jax_prec_highest", {"keep_memory": True}, "highest")])
def test_train_step_vs_torch_workers_apply_the_settings_their_variant_names(name, call, precision, monkeypatch):
    from lecture3 import runtime

    bench = _load("step_variants")
    calls, updates = [], []
    monkeypatch.setattr(runtime, "cpu_defaults", lambda **kw: calls.append(kw) or {"xla_flags": True})
    monkeypatch.setattr(jax.config, "update", lambda key, value: updates.append((key, value)))
    applied = bench.apply_settings(bench.VARIANTS[name])
    assert calls == ([] if call is None else [call])
    assert applied == ({} if call is None else {"xla_flags": True})
    assert updates == ([] if precision is None else [("jax_default_matmul_precision", precision)])
