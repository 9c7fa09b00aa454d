"""Every registered preset, trained for a few dozen steps, under every strategy and precision
path: it trains, evaluates its validation split, and serves a model that reads digits.

A short run is where batch norm's moving statistics have not settled (a model that trained
to 72% served 11%, chance); validation over two replicas is where a replica's empty batch
crashed the book's model. Both pass through these runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cnnmnist import hardware, presets
from cnnmnist.cli import cli

WORKER = Path(__file__).with_name("distributed_worker.py")
STEPS = 30  # a few dozen: too few for batch norm's moving averages (momentum 0.99) to settle
BF16_STEPS = 15
VALIDATION = 1000
# Chance is 10%. After 30 steps every preset reads most of the test set (the weakest, the
# book's N(0, 0.01) model, reached about 80% here), so a near-chance model fails at once.
WELL_ABOVE_CHANCE = 0.6
# The epoch's training accuracy is a running mean over its steps, below what the final
# weights reach; the served model must not be far below it (the broken one was 61 points under).
BELOW_TRAINING = 0.05
# Mixed float16 (what `auto` picks on a GPU) runs emulated on a CPU, seconds a step on some:
# its runs here take half the preset's batch (FLOAT16_ON_CPU), which still learns enough.
# oneDNN's kernels are what broke on an empty batch; they are on by default only on some CPUs.
ONEDNN = {"TF_ENABLE_ONEDNN_OPTS": "1"}


def short_run(
    preset: presets.Preset, out: Path, *extra: str, steps: int = STEPS, batch: int | None = None
) -> list[str]:
    """A CLI command line: 1 epoch of `steps` of the preset's own batch (or `batch`), with
    validation."""
    batch = batch or preset.batch_size
    return [
        "train",
        "--preset",
        preset.name,
        "--epochs",
        "1",
        "--batch-size",
        str(batch),
        "--train-size",
        str(steps * batch),
        "--validation-size",
        str(VALIDATION),
        "--seed",
        "1",
        "--out",
        str(out),
        "--json",
        *extra,
    ]


def assert_serves_what_it_learned(report: dict, out: Path) -> None:
    row = report["history"][-1]
    assert set(row) >= {"accuracy", "val_accuracy"}
    assert report["test_accuracy"] > WELL_ABOVE_CHANCE, report
    assert report["test_accuracy"] > row["accuracy"] - BELOW_TRAINING, report
    assert report["warnings"] == []
    # What `evaluate` reads back from the written checkpoint is what training reported.
    result = CliRunner().invoke(cli, ["evaluate", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(report["test_accuracy"], abs=2e-4)


NAMES = [p.name for p in presets.all_presets()]


LOAD_KERAS = """
import json, sys
import keras
import numpy as np
import cnnmnist.model  # registers cnnmnist's Keras classes: all that load_model needs
from cnnmnist import checkpoint, data, runners
ckpt, mnist_dir = sys.argv[1:]
images = data.load("mnist", mnist_dir).test_images[:200]
net = keras.saving.load_model(f"{ckpt}/{checkpoint.KERAS_MODEL}")
assert net.optimizer is not None  # with its optimizer state, for further training
logits = net.predict(images.reshape(-1, 28, 28, 1).astype("float32"), verbose=0)
probs = np.exp(logits - logits.max(axis=1, keepdims=True))
probs /= probs.sum(axis=1, keepdims=True)
served = runners.load(checkpoint.read(ckpt), fast=False).probabilities(images)
print(json.dumps({"max_difference": float(np.abs(probs - served).max())}))
"""


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_on_one_device(name, tmp_path, mnist_dir):
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(
        cli, short_run(presets.get(name), out, "--data-dir", str(mnist_dir))
    )
    assert result.exit_code == 0, result.output
    assert_serves_what_it_learned(json.loads(result.stdout), out)
    # The record says how many training 1s were given a flag: some, if the recipe asks.
    flagged = json.loads((out / "cnnmnist.json").read_text())["dataset"]["flagged_ones"]
    assert (flagged > 0) == (presets.get(name).flagged_ones > 0)
    # model.keras loads in a process that has not trained (its own layers unregistered)
    # and gives the SavedModel's probabilities (to bfloat16's precision, where it trained so).
    done = subprocess.run(
        [sys.executable, "-c", LOAD_KERAS, str(out), str(mnist_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["max_difference"] < 0.02


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_mirrored_over_two_replicas(name, tmp_path, mnist_dir):
    out = tmp_path / "ckpt"
    command = [sys.executable, str(WORKER), "--logical-cpus", "2"]
    command += short_run(presets.get(name), out, "--strategy", "mirrored")
    done = subprocess.run(
        command, env={**os.environ, **ONEDNN}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    report = json.loads(done.stdout)
    meta = json.loads((out / "cnnmnist.json").read_text())
    assert meta["distribution"]["replicas"] == 2
    assert_serves_what_it_learned(report, out)


NATIVE_BF16 = bool(hardware.cpu_flags() & hardware.NATIVE_BF16)
# `auto` is bfloat16 on a CPU with native BF16 and float32 elsewhere; the one-device test
# runs `auto`, this runs the other path (emulated bfloat16 on a CPU without it: slow, hence
# fewer steps).
OTHER_PRECISION = "float32" if NATIVE_BF16 else "bfloat16"
AUTO = [p.name for p in presets.all_presets() if p.precision == "auto"]


@pytest.mark.parametrize("name", AUTO)
# float16 is what `auto` picks on a GPU: mixed float16 with loss scaling (on this CPU
# without XLA; test_precision compiles float16 steps with it).
@pytest.mark.parametrize("precision", [OTHER_PRECISION, "float16"])
def test_presets_that_pick_their_precision_train_on_the_other_paths(
    name, precision, tmp_path, mnist_dir
):
    out = tmp_path / "ckpt"
    extra = ("--data-dir", str(mnist_dir), "--precision", precision)
    preset = presets.get(name)
    batch = preset.batch_size // 2 if precision == "float16" else None  # FLOAT16_ON_CPU
    result = CliRunner().invoke(cli, short_run(preset, out, *extra, steps=BF16_STEPS, batch=batch))
    assert result.exit_code == 0, result.output
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
    assert json.loads((out / "cnnmnist.json").read_text())["dtype_policy"] == policy[precision]
    assert_serves_what_it_learned(json.loads(result.stdout), out)


@pytest.mark.parametrize("path", ["mirrored", OTHER_PRECISION, "float16"])
def test_clean_epochs_train_on_the_other_paths(path, tmp_path):
    """`best` with its last epochs through the network without the augmentation (the
    one-device run, in `auto`, is test_train's): two epochs of 15 steps, the second clean,
    over two replicas, in the precision `auto` does not pick here, and in mixed float16."""
    best = presets.get("best")
    assert best.with_overrides(epochs=2).first_clean_epoch == 1  # the second epoch is clean
    out = tmp_path / "ckpt"
    args = short_run(best, out, steps=15, batch=best.batch_size // 2 if path == "float16" else None)
    args[args.index("--epochs") + 1] = "2"
    if path == "mirrored":
        command = [sys.executable, str(WORKER), "--logical-cpus", "2"]
        command += [*args, "--strategy", "mirrored"]
    else:
        command = [sys.executable, "-m", "cnnmnist.cli", *args, "--precision", path]
    done = subprocess.run(
        command, env={**os.environ, **ONEDNN}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert len(report["history"]) == 2
    recorded = json.loads((out / "cnnmnist.json").read_text())["hyperparameters"]
    assert recorded["clean_epochs"] == best.clean_epochs
    assert_serves_what_it_learned(report, out)


EVALUATE_MIRRORED = """
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from cnnmnist import data, model, presets
from cnnmnist.training import loop
keras.utils.set_random_seed(0)
net = model.build(presets.get(sys.argv[1]).model)
ds = data.load("mnist", sys.argv[2], allow_download=False)
images, labels = ds.test_images[:2500], ds.test_labels[:2500]
one = loop.Evaluation(net, tf.distribute.get_strategy())(images, labels)
two = loop.Evaluation(net, tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))(images, labels)
print(json.dumps({"one": one, "two": two}))
"""


@pytest.mark.parametrize("name", ["seed", "best"])
def test_evaluation_over_two_replicas_equals_one_device(name, mnist_dir):
    # 2,500 images over 2 replicas of 1,000: the last step has 500 images for replica 0 and
    # none for replica 1, which is padded and weighed 0.
    done = subprocess.run(
        [sys.executable, "-c", EVALUATE_MIRRORED, name, str(mnist_dir)],
        env={**os.environ, **ONEDNN},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got["two"], got["one"], rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_presets_train_on_fashion_mnist(name, tmp_path, fashion_mnist_dir):
    out = tmp_path / "ckpt"
    args = short_run(presets.get(name), out, "--dataset", "fashion-mnist")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    dataset = json.loads((out / "cnnmnist.json").read_text())["dataset"]
    assert dataset["name"] == "fashion-mnist"
    assert dataset["flagged_ones"] == 0  # label 1 is a trouser there
    # Clothes are harder than digits: 30 steps reach 60-74% here (seed-layers, with its
    # dropout of 0.7, the least); chance is 10%.
    assert report["test_accuracy"] > 0.5 and report["warnings"] == []
