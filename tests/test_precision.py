"""--precision: the detection logic, and a bfloat16 run that still learns."""

import json
import os
import subprocess
import sys

import pytest

from cnnmnist import hardware, presets
from cnnmnist.errors import CnnmnistError, UsageError


@pytest.mark.parametrize(
    "choice, flags, gpu, policy",
    [
        ("auto", {"avx2", "avx512f", "avx512_bf16"}, False, "mixed_bfloat16"),
        ("auto", {"avx2", "amx_bf16", "amx_tile"}, False, "mixed_bfloat16"),
        ("auto", {"avx2", "avx512f"}, False, "float32"),  # bf16 would be emulated: slower
        ("auto", set(), False, "float32"),
        ("auto", {"avx512_bf16"}, True, "mixed_float16"),
        ("float32", {"avx512_bf16"}, True, "float32"),
        ("bfloat16", set(), False, "mixed_bfloat16"),
        ("float16", set(), False, "mixed_float16"),
    ],
)
def test_resolve_precision(choice, flags, gpu, policy):
    assert hardware.resolve_precision(choice, flags, gpu) == policy


BF16_CPU = {"avx2", "avx512f", "avx512_bf16"}


def test_onednn_held_under_avx512_makes_a_cpu_without_native_bfloat16(monkeypatch):
    for value, cap in [
        ("AVX2", "AVX2"),
        ("avx2_vnni", "AVX2_VNNI"),
        ("AVX512_CORE", None),
        ("", None),
    ]:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", value)
        assert hardware.onednn_cap() == cap
    assert hardware.resolve_precision("auto", BF16_CPU, False, "AVX2") == "float32"
    assert hardware.resolve_precision("float32", BF16_CPU, False, "AVX2") == "float32"
    assert hardware.resolve_precision("float16", BF16_CPU, False, "AVX2") == "mixed_float16"
    # A CPU without native bfloat16 emulates it whatever the cap; a GPU computes it itself.
    assert hardware.resolve_precision("bfloat16", {"avx2"}, False, "AVX2") == "mixed_bfloat16"
    assert hardware.resolve_precision("bfloat16", BF16_CPU, True, "AVX2") == "mixed_bfloat16"
    with pytest.raises(UsageError, match="ONEDNN_MAX_CPU_ISA=AVX2.*--precision float32"):
        hardware.resolve_precision("bfloat16", BF16_CPU, False, "AVX2")


def test_auto_trains_in_float32_with_onednn_held_to_avx2(tmp_path, mnist_dir):
    """On a CPU with native bfloat16 this run used to abort ("training failed: AbortedError")."""
    out = tmp_path / "ckpt"
    args = ["train", "--preset", "fast", "--epochs", "1", "--train-size", "2560"]
    args += ["--data-dir", str(mnist_dir), "--out", str(out), "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "cnnmnist", *args],
        env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["test_accuracy"] > 0.6
    assert json.loads((out / "cnnmnist.json").read_text())["dtype_policy"] == "float32"


def test_cpu_flags_reads_this_machine():
    flags = hardware.cpu_flags()
    assert isinstance(flags, set)
    if flags:
        assert "sse2" in flags or "fp" in flags or "asimd" in flags


def test_chapter_presets_stay_float32():
    for name in ("seed", "seed-layers", "mlp"):
        assert presets.get(name).precision == "float32"


def test_bfloat16_run_learns_and_exports_float32_probabilities(tmp_path, mnist_dir, mnist):
    if not hardware.cpu_flags() & hardware.NATIVE_BF16:
        pytest.skip("this CPU has no native bfloat16")
    import keras

    from cnnmnist import training

    recipe = presets.get("seed").with_overrides(
        precision="bfloat16", epochs=1, train_size=30000, validation_size=1000, seed=1
    )
    result = training.run(
        recipe, training.Options(data_dir=mnist_dir, out=tmp_path / "bf16")
    )  # 300 steps
    assert result.test_accuracy > 0.9  # chance is 0.1; float32 gets ~0.95 here
    assert keras.mixed_precision.global_policy().name == "float32"  # restored afterwards
    from cnnmnist import checkpoint, runners

    ckpt = checkpoint.read(tmp_path / "bf16")
    assert ckpt.metadata["dtype_policy"] == "mixed_bfloat16"
    probs = runners.load(ckpt, fast=False).probabilities(mnist.test_images[:100])
    assert probs.dtype.name == "float32" and abs(float(probs.sum()) - 100) < 1e-2


def test_the_precision_flag_reaches_the_recipe(monkeypatch):
    from click.testing import CliRunner

    from cnnmnist import training
    from cnnmnist.cli import cli

    seen = {}

    def fake_run(recipe, options):
        seen["recipe"] = recipe
        raise CnnmnistError("stop here")

    monkeypatch.setattr(training, "run", fake_run)
    result = CliRunner().invoke(cli, ["train", "--precision", "bfloat16", "--epochs", "2"])
    assert result.exit_code == 1 and "stop here" in result.output
    assert seen["recipe"].precision == "bfloat16" and seen["recipe"].epochs == 2
    assert seen["recipe"].learning_rate == presets.get("seed").learning_rate


def test_the_gpu_path_float16_loss_scaling_and_xla_learns_on_cpu(mnist):
    """What a GPU gets (mixed float16 with loss scaling, the step compiled by XLA), run on
    this CPU for correctness: 100 steps of the mlp must learn like float32 does (~93%)."""
    import keras
    import tensorflow as tf

    from cnnmnist.training import loop, network, runtime

    recipe = presets.get("mlp")
    x, y = mnist.split("train", 5000)
    with runtime.global_policy("mixed_float16"):
        net = network.compiled(recipe, 100)
        assert isinstance(net.optimizer, keras.optimizers.LossScaleOptimizer)
        net.jit_compile = True  # Keras's choice on a GPU; on a CPU it says False
        trainer = loop.Loop(net, tf.distribute.get_strategy(), 100, chunk=loop.CHUNK)
        trainer.fit_arrays(x[:10000], y[:10000], 0, range(1))
        loss, accuracy = trainer.evaluate(*mnist.split("validation", 5000))
    assert net.optimizer.iterations.numpy() == 100
    assert accuracy > 0.85 and loss < 0.6  # chance: 10%, loss 2.3


# Keras's own random image layers say they cannot be compiled by XLA; Keras then trains
# such a model without it. Every other layer, ours included, must compile.
NO_XLA = ("RandomRotation", "RandomTranslation", "RandomZoom")


@pytest.mark.parametrize("name", [p.name for p in presets.all_presets()])
def test_every_preset_steps_under_xla_where_keras_would_compile_it(name, mnist):
    """On a GPU, Keras compiles the training step with XLA unless a layer refuses; an op
    without an XLA kernel then fails the run there. Two compiled steps of each preset, here."""
    import numpy as np
    import tensorflow as tf

    from cnnmnist.training import loop, network

    recipe = presets.get(name)
    net = network.compiled(recipe, 2)
    refusing = [type(layer).__name__ for layer in net.layers if not layer.supports_jit]
    assert set(refusing) <= set(NO_XLA), refusing
    net.jit_compile = True  # Keras's choice on a GPU; it stays False if a layer refuses
    assert net.jit_compile == (not refusing)
    if not net.jit_compile:
        return
    x, y = mnist.split("train", 5000)
    trainer = loop.Loop(net, tf.distribute.get_strategy(), 32, chunk=2)
    trainer.fit_arrays(x[:64], y[:64], 0, range(1))
    assert net.optimizer.iterations.numpy() == 2
    assert all(np.isfinite(v.numpy()).all() for v in net.trainable_variables)
