"""Training on the real MNIST and the checkpoint it writes."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import without_package

from cnnmnist import checkpoint, model, presets, training
from cnnmnist.cli import cli


def test_one_epoch_of_the_reference_recipe_reaches_96_percent(trained):
    # Measured here: about 96.6% after one epoch with the chapter's N(0, 0.01) no-bias init.
    assert trained.test_accuracy >= 0.96
    assert len(trained.history) == 1
    row = trained.history[0]
    assert row["epoch"] == 1 and {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(row)
    assert row["val_accuracy"] > 0.95


def test_saved_model_signature_agrees_with_the_in_memory_model(trained, mnist):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(trained.checkpoint))
    fn = loaded.signatures["serving_default"]
    pixels = mnist.test_images.reshape(-1, 28, 28, 1).astype(np.float32)  # raw 0..255
    probs = np.concatenate(
        [
            fn(pixels=tf.constant(pixels[i : i + 2000]))["probabilities"].numpy()
            for i in range(0, 10000, 2000)
        ]
    )
    assert probs.shape == (10000, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    logits = trained.model.predict(pixels, batch_size=2000, verbose=0)
    assert np.array_equal(probs.argmax(axis=1), logits.argmax(axis=1))
    accuracy = (probs.argmax(axis=1) == mnist.test_labels).mean()
    assert accuracy == pytest.approx(trained.test_accuracy, abs=1e-6)


def test_checkpoint_describes_itself(trained):
    ckpt = checkpoint.read(trained.checkpoint)
    meta = ckpt.metadata
    assert meta["format_version"] == checkpoint.FORMAT_VERSION
    assert meta["preset"] == "seed"
    assert meta["hyperparameters"]["optimizer"] == "adam" and meta["hyperparameters"]["epochs"] == 1
    assert meta["dataset"]["name"] == "mnist"
    assert meta["dataset"]["train_size"] == 55000 and meta["dataset"]["validation_size"] == 5000
    assert (
        meta["dataset"]["checksums"]["t10k-images-idx3-ubyte"] == "2646ac647ad5339dbf082846283269ea"
    )
    assert meta["test"]["accuracy"] == pytest.approx(trained.test_accuracy)
    assert {"tensorflow", "keras", "cnnmnist", "python"} <= set(meta["versions"])
    assert meta["history"] == trained.history
    for name in checkpoint.REQUIRED:
        assert (trained.checkpoint / name).is_file()


def test_keras_model_with_optimizer_state_reloads(trained):
    import keras

    model = keras.saving.load_model(trained.checkpoint / checkpoint.KERAS_MODEL)
    assert int(model.optimizer.iterations.numpy()) == 550  # 55,000 images / batch 100
    for a, b in zip(model.get_weights(), trained.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def small(**changes):
    """The seed recipe on 5,000 training images: a few seconds."""
    return presets.get("seed").with_overrides(epochs=1, train_size=5000, **changes)


def test_same_seed_same_result(tmp_path, mnist_dir):
    a = training.run(small(seed=3), training.Options(data_dir=mnist_dir, out=tmp_path / "a"))
    b = training.run(small(seed=3), training.Options(data_dir=mnist_dir, out=tmp_path / "b"))
    c = training.run(small(seed=4), training.Options(data_dir=mnist_dir, out=tmp_path / "c"))
    assert a.test_accuracy == b.test_accuracy
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert not all(
        np.array_equal(wa, wc)
        for wa, wc in zip(a.model.get_weights(), c.model.get_weights(), strict=True)
    )


def test_cli_train_json_and_overwrite_refusal(tmp_path, mnist_dir):
    out = tmp_path / "ckpt"
    args = [
        "train",
        "--epochs",
        "1",
        "--train-size",
        "5000",
        "--data-dir",
        str(mnist_dir),
        "--out",
        str(out),
        "--json",
        "--seed",
        "1",
    ]
    runner = CliRunner()
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert {
        "checkpoint",
        "preset",
        "epochs",
        "test_accuracy",
        "test_loss",
        "history",
        "seconds",
    } <= set(report)
    assert report["checkpoint"] == str(out) and report["epochs"] == 1
    assert 0.5 < report["test_accuracy"] <= 1.0  # 5,000 images, one epoch: about 80% here
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    again = runner.invoke(cli, args)
    assert again.exit_code == 1
    assert "already exists" in again.output and "--force" in again.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    forced = runner.invoke(cli, [*args[:-2], "--seed", "2", "--force"])
    assert forced.exit_code == 0, forced.output
    assert checkpoint.read(out).metadata["seed"] == 2
    # Nothing left beside it: no temporaries, no lock file, no resume state.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_plain_progress_is_one_line_per_epoch(tmp_path, mnist_dir):
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--epochs",
            "2",
            "--train-size",
            "3000",
            "--validation-size",
            "1000",
            "--data-dir",
            str(mnist_dir),
            "--out",
            str(tmp_path / "c"),
            "--tensorboard",
            str(tmp_path / "logs"),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    # One vocabulary: the words of the history and --json (the old "cost", "val acc" are gone).
    assert "val_accuracy" in lines[0] and "loss" in lines[0]
    assert "test accuracy" in result.stdout
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))  # TensorBoard wrote logs


def test_gpu_device_without_a_gpu_fails_clearly(tmp_path, mnist_dir):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(
        cli,
        ["train", "--device", "gpu", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "g")],
    )
    assert result.exit_code == 1 and "no GPU" in result.output


def test_tensorboard_without_the_package_fails_before_training(tmp_path, monkeypatch):
    without_package(monkeypatch, "tensorboard")
    result = CliRunner().invoke(
        cli, ["train", "--tensorboard", str(tmp_path / "tb"), "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 1 and "pip install 'cnnmnist[tensorboard]'" in result.output
    assert not (tmp_path / "c").exists()


def test_label_smoothing_trains_against_the_smoothed_target(mnist):
    """One SGD step of the loop with label smoothing 0.1 equals one by hand against
    Keras's CategoricalCrossentropy(label_smoothing=0.1); with 0 it is plain cross-entropy."""
    import keras
    import tensorflow as tf

    from cnnmnist.training import loop, network, pipeline

    x, y = mnist.split("train", 5000)
    recipe = presets.get("mlp").with_overrides(optimizer="sgd", learning_rate=0.5)
    batch_x, batch_y = next(iter(pipeline.training_batches(x[:100], y[:100], 100, 0, range(1))))
    for smoothing in (0.1, 0.0):
        keras.utils.set_random_seed(0)  # the same start both times: only the target differs
        net = network.compiled(recipe)
        by_hand = keras.models.clone_model(net)
        by_hand.set_weights(net.get_weights())
        trainer = loop.Loop(net, tf.distribute.get_strategy(), 100, 1, label_smoothing=smoothing)
        trainer.fit_arrays(x[:100], y[:100], 0, range(1))  # one step: the batch above
        target = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing)
        with tf.GradientTape() as tape:
            loss = target(tf.one_hot(batch_y, 10), by_hand(batch_x, training=True))
        grads = tape.gradient(loss, by_hand.trainable_variables)
        for w, g, trained_w in zip(
            by_hand.trainable_variables, grads, net.trainable_variables, strict=True
        ):
            np.testing.assert_allclose(trained_w.numpy(), w.numpy() - 0.5 * g.numpy(), atol=2e-6)
        if smoothing:
            smoothed_weights = net.get_weights()
    plain_weights = net.get_weights()
    assert (
        max(np.abs(a - b).max() for a, b in zip(smoothed_weights, plain_weights, strict=True))
        > 1e-4
    )


@pytest.mark.parametrize("name", ["fast", "best"])
def test_the_clean_twin_shares_every_layer_but_the_augmentation(name, mnist):
    import keras

    from cnnmnist.model.layers import AUGMENTATION

    net = model.build(presets.get(name).model)
    clean = model.without_augmentation(net)
    kept = [layer for layer in net.layers[1:] if not isinstance(layer, AUGMENTATION)]
    assert len(kept) < len(net.layers) - 1  # these presets augment
    assert clean.layers[1:] == kept  # the same layer objects, in order: the same weights
    x = mnist.test_images[:64].reshape(-1, 28, 28, 1).astype("float32")
    same = keras.ops.convert_to_numpy(clean(x, training=False))
    np.testing.assert_allclose(same, keras.ops.convert_to_numpy(net(x, training=False)), atol=1e-5)


def test_a_network_that_branches_has_no_clean_twin():
    import keras

    pixels = keras.Input((28, 28, 1))
    flat = keras.layers.Flatten()(pixels)
    branches = keras.layers.Add()([keras.layers.Dense(10)(flat), keras.layers.Dense(10)(flat)])
    with pytest.raises(ValueError, match="not a chain of layers"):
        model.without_augmentation(keras.Model(pixels, branches))


def test_clean_epochs_train_on_the_digits_as_given(tmp_path, mnist_dir):
    """The last epoch without augmentation: the epochs before it are the same run, and in
    it the network fits its (unmarked, unturned) digits far better than an augmented one."""
    runs = []
    for clean in ("0", "1"):
        config = tmp_path / f"clean{clean}.toml"
        config.write_text(f'preset = "best"\nclean_epochs = {clean}\n')
        args = ["train", "--config", str(config), "--epochs", "2", "--train-size", "6400"]
        args += ["--seed", "1", "--data-dir", str(mnist_dir), "--out", str(tmp_path / clean)]
        result = CliRunner().invoke(cli, [*args, "--json"])
        assert result.exit_code == 0, result.output
        runs.append(json.loads(result.stdout)["history"])
    augmented, clean = runs
    assert clean[0]["loss"] == augmented[0]["loss"]  # epoch 1 is augmented in both
    # Measured: 95.6% against 85.3% for the augmented epoch 2.
    assert clean[1]["accuracy"] > augmented[1]["accuracy"] + 0.05
    meta = json.loads((tmp_path / "1" / "cnnmnist.json").read_text())
    assert meta["hyperparameters"]["clean_epochs"] == 1
