"""Users' own labelled folders (`evaluate --images`) and the corruption suite (`--corruptions`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cnnmnist import corruptions, sheets
from cnnmnist.cli import cli


@pytest.mark.parametrize("name", sorted(corruptions.CORRUPTIONS))
def test_each_corruption_is_deterministic_bounded_and_not_the_identity(name, mnist):
    images = mnist.test_images[:200]
    once = corruptions.apply(name, images)
    assert once.dtype == np.uint8 and once.shape == images.shape
    assert np.array_equal(once, corruptions.apply(name, images))  # the same seed, the same images
    assert not np.array_equal(once, corruptions.apply(name, images, seed=corruptions.SEED + 1)) or (
        name in DETERMINISTIC_BY_NATURE
    )
    changed = (once != images).any(axis=(1, 2))
    assert changed.mean() > 0.9, f"{name} left {1 - changed.mean():.0%} of the images unchanged"
    assert np.array_equal(images, mnist.test_images[:200])  # the input is not modified


# Corruptions with no random choice: their images do not depend on the seed.
DETERMINISTIC_BY_NATURE = {
    "gaussian_blur",
    "thinner",
    "thicker",
    "low_resolution",
    "brightness",
    "contrast",
    "edges",
}


def test_the_suite_covers_what_the_issue_asks_for():
    asked = {"shot_noise", "impulse_noise", "shear", "scale", "rotate", "translate", "thinner"}
    asked |= {"thicker", "low_resolution", "brightness", "contrast", "stripe", "dotted_line"}
    asked |= {"zigzag", "edges", "motion_blur", "glass_blur", "gaussian_blur"}
    assert asked <= set(corruptions.CORRUPTIONS)


def test_corruptions_refuse_what_is_not_a_batch_of_digits():
    with pytest.raises(ValueError, match="uint8 images"):
        corruptions.apply("rotate", np.zeros((2, 28, 28), np.float32))


def test_the_robustness_report_runs_end_to_end(trained, tmp_path, mnist_dir):
    # A copy whose recorded validation split is 200 images keeps the suite quick.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained.checkpoint, ckpt)
    meta = json.loads((ckpt / "cnnmnist.json").read_text())
    meta["dataset"]["validation_size"] = 200
    (ckpt / "cnnmnist.json").write_text(json.dumps(meta))
    args = ["evaluate", str(ckpt), "--corruptions", "--split", "validation"]
    args += ["--data-dir", str(mnist_dir)]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 200
    assert [row["name"] for row in report["corruptions"]] == list(corruptions.CORRUPTIONS)
    accuracies = [row["accuracy"] for row in report["corruptions"]]
    assert report["mean_accuracy"] == pytest.approx(np.mean(accuracies))
    assert report["clean_accuracy"] > 0.9  # one epoch of the book's model
    assert min(accuracies) < report["clean_accuracy"]  # some corruption costs accuracy
    # Preprocessing undoes what it is built to undo: grey paper, faded ink, an off-centre digit.
    by_name = {row["name"]: row for row in report["corruptions"]}
    for undone in ("brightness", "contrast", "translate"):
        assert by_name[undone]["accuracy_prepared"] > by_name[undone]["accuracy"] + 0.2
    assert report["mean_accuracy_prepared"] == pytest.approx(
        np.mean([row["accuracy_prepared"] for row in report["corruptions"]])
    )
    # The clean figure is the plain evaluation's.
    plain = CliRunner().invoke(cli, [*args[:2], "--split", "validation", "--json"] + args[-2:])
    assert json.loads(plain.stdout)["accuracy"] == report["clean_accuracy"]
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0 and "zigzag" in table.output and "mean" in table.output


def _folder(root, mnist, count=40):
    """count test digits as users would save them: dark ink on white, larger, some as JPEG."""
    for i in range(count):
        label = int(mnist.test_labels[i])
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(255 - mnist.test_images[i]).resize((90, 90), Image.BILINEAR)
        image.save(root / str(label) / f"{i}.{'jpg' if i % 3 else 'png'}")
    return root


def test_evaluate_images_agrees_with_predict_on_the_same_files(trained, tmp_path, mnist):
    folder = _folder(tmp_path / "mine", mnist)
    (folder / "3" / "broken.png").write_bytes(b"not a png")
    (folder / "3" / "README.txt").write_text("not an image")
    (folder / "7" / "blank.png").parent.mkdir(exist_ok=True)
    Image.new("L", (40, 40), 255).save(folder / "7" / "blank.png")
    runner = CliRunner()
    result = runner.invoke(
        cli, ["evaluate", str(trained.checkpoint), "--images", str(folder), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {Path(u["file"]).name for u in report["unreadable"]} == {"broken.png", "blank.png"}
    assert "broken.png" in result.stderr and "README.txt" not in result.stdout

    expected_correct = 0
    files = sorted(p for p in folder.rglob("*.*") if p.suffix in (".png", ".jpg"))
    predicted = json.loads(
        runner.invoke(
            cli, ["predict", "--model", str(trained.checkpoint), "--json", *map(str, files)]
        ).stdout
    )
    judged = [r for r in predicted if r["digit"] is not None]
    for r in judged:
        expected_correct += r["digit"] == int(Path(r["file"]).parent.name)
    assert report["n"] == len(judged) == 40
    assert report["correct"] == expected_correct
    assert report["accuracy"] == pytest.approx(expected_correct / len(judged))


def test_evaluate_images_errors_draws_the_original_beside_the_input(trained, tmp_path, mnist):
    folder = _folder(tmp_path / "mine", mnist, count=12)
    # Mislabel every image so that each one is a mistake to draw.
    for sub in sorted(p for p in folder.iterdir()):
        sub.rename(folder / f"tmp{sub.name}")
    for sub in sorted(folder.iterdir()):
        sub.rename(folder / str((int(sub.name[3:]) + 1) % 10))
    target = tmp_path / "errors.png"
    args = ["evaluate", str(trained.checkpoint), "--images", str(folder)]
    result = CliRunner().invoke(cli, [*args, "--errors", str(target), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    mistakes = report["n"] - report["correct"]
    assert mistakes >= 10  # every label is wrong; only a model's own mistake can match it
    picture = Image.open(target)
    assert picture.size == sheets.size(mistakes, originals=True)
    left = np.asarray(picture)[: sheets.SIDE, : sheets.SIDE]
    assert (left < 128).any() and (left > 128).any()  # the original: dark ink on light paper


@pytest.mark.parametrize(
    "layout, message",
    [
        (lambda d: (d / "a.png").touch(), "no class subfolders"),
        (lambda d: ((d / "3").mkdir(), (d / "cats").mkdir()), "not named for a digit: cats"),
        (lambda d: (d / "3").mkdir(), "no image files"),
        (lambda d: None, "no class subfolders"),
    ],
)
def test_a_folder_not_laid_out_by_digit_is_a_clear_error(trained, tmp_path, layout, message):
    folder = tmp_path / "mine"
    folder.mkdir()
    layout(folder)
    result = CliRunner().invoke(cli, ["evaluate", str(trained.checkpoint), "--images", str(folder)])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and str(folder) in result.output


def test_images_does_not_mix_with_options_of_the_dataset(trained, tmp_path):
    (tmp_path / "mine" / "1").mkdir(parents=True)
    for extra in (["--split", "train"], ["--corruptions"], ["--dataset", "mnist"]):
        result = CliRunner().invoke(
            cli,
            ["evaluate", str(trained.checkpoint), "--images", str(tmp_path / "mine"), *extra],
        )
        assert result.exit_code == 2 and extra[0] in result.output, result.output


def test_user_like_augmentation_trains_on_degraded_digits_and_serves_them_as_given(mnist):
    import keras

    from cnnmnist.model import layers

    layer = layers.UserLike(rate=0.5, seed=3)
    images = mnist.test_images[:400].reshape(-1, 28, 28, 1).astype("float32") / 255
    trained = keras.ops.convert_to_numpy(layer(images, training=True))
    assert np.array_equal(keras.ops.convert_to_numpy(layer(images, training=False)), images)
    changed = np.abs(trained - images).max(axis=(1, 2, 3)) > 1e-3
    assert 0.35 < changed.mean() < 0.65  # about `rate` of the images, each in one of 5 ways
    thicker = (trained > 0.5).sum(axis=(1, 2, 3)) > (images > 0.5).sum(axis=(1, 2, 3))
    thinner = (trained > 0.5).sum(axis=(1, 2, 3)) < (images > 0.5).sum(axis=(1, 2, 3))
    assert thicker.sum() > 20 and thinner.sum() > 20
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config  # model.keras reloads it


def test_marks_augmentation_draws_each_kind_of_mark_on_its_share_and_serves_as_given(mnist):
    import keras

    from cnnmnist.model import layers

    layer = layers.Marks(rate=0.45, seed=5)  # 9 units of 20 images: 40 per mark, 20 moved
    images = mnist.test_images[:400].reshape(-1, 28, 28, 1).astype("float32") / 255
    marked = keras.ops.convert_to_numpy(layer(images, training=True))
    assert np.array_equal(keras.ops.convert_to_numpy(layer(images, training=False)), images)
    assert marked.min() >= 0 and marked.max() <= 1
    changed = np.abs(marked - images).max(axis=(1, 2, 3)) > 1e-3
    assert not changed[:220].any() and changed[220:].mean() > 0.95  # the last 45%, no other
    before, after = images[220:, ..., 0], marked[220:, ..., 0]
    specks, stroke, outline, band = (slice(k * 40, (k + 1) * 40) for k in range(4))
    # Specks: scattered single pixels, on the paper as well as on the ink.
    flipped = np.abs(after - before) > 0.5
    assert ((before < 0.1) & flipped)[specks].mean() > 0.01
    # A stroke adds ink and takes none away.
    assert (after[stroke] >= before[stroke] - 1e-6).all()
    assert ((after - before)[stroke] > 0.5).sum(axis=(1, 2)).min() >= 5
    # An outline: the ink's core is gone, a ring outside it is new.
    core, ring = before[outline] > 0.9, after[outline] > 0.5
    assert (core & ring).sum() < 0.05 * core.sum() and (ring & (before[outline] < 0.1)).any()
    # A band: what changed lies in 2-6 adjacent rows or columns.
    moved = np.abs(after[band] - before[band]) > 1e-6
    assert moved.any(axis=(1, 2)).mean() > 0.8  # erasing paper or inverting no ink is no change
    for m in moved[moved.any(axis=(1, 2))]:
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        span = min(np.ptp(rows), np.ptp(cols)) + 1
        assert span <= 6, (rows, cols)
    # A moved digit: the same pixels 3-6 rows and 3-6 columns away, either way, paper behind.
    for digit, shifted in zip(before[160:], after[160:], strict=True):
        padded = np.pad(digit, 6)
        found = [
            (down, right)
            for down in (*range(-6, -2), *range(3, 7))
            for right in (*range(-6, -2), *range(3, 7))
            if np.array_equal(shifted, padded[6 - down : 34 - down, 6 - right : 34 - right])
        ]
        assert found, "not the digit moved 3-6 px along each axis"
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config  # model.keras reloads it
    # The preset's shares: 4 of each mark and 2 moved digits in 128 images, and on a
    # replica's 32 images still one of each mark.
    for size, drawn in ((128, 18), (32, 4)):
        batch = images[:size]
        change = np.abs(layers.Marks(seed=5)(batch, training=True) - batch).max(axis=(1, 2, 3))
        assert not (change[:-drawn] > 1e-3).any() and (change[-drawn:] > 1e-3).mean() >= 0.75


@pytest.mark.parametrize("side", [9, 12, 15])
def test_user_like_low_resolution_is_tensorflows_antialiased_resize(side):
    """The augmentation's low resolution is a pair of matrices (XLA compiles those), equal to
    an antialiased resize down and a bilinear one back up."""
    import tensorflow as tf

    from cnnmnist.model import layers

    images = np.random.default_rng(side).random((8, 28, 28, 1)).astype(np.float32)
    there_and_back = layers.resampling(28, side) @ layers.resampling(side, 28)
    ours = np.einsum("ij,bjkc,lk->bilc", there_and_back, images, there_and_back)
    low = tf.image.resize(images, (side, side), antialias=True)
    theirs = tf.image.resize(low, (28, 28)).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_stretch_passes_mnist_through_and_reads_grey_paper_as_black(mnist):
    import keras

    from cnnmnist.model import layers

    layer = layers.Stretch()
    images = mnist.test_images.reshape(-1, 28, 28, 1)
    scaled = images.astype("float32") / 255
    # Every MNIST digit spans the full range: exactly what the network was trained on.
    assert np.array_equal(keras.ops.convert_to_numpy(layer(scaled)), scaled)
    for name in ("brightness", "contrast"):
        grey = corruptions.apply(name, mnist.test_images[:500]).reshape(-1, 28, 28, 1) / 255
        back = keras.ops.convert_to_numpy(layer(grey.astype("float32")))
        assert back.min() == 0 and back.max() == pytest.approx(254 / 255)
        # Brightness clips the ink at white, so its edges come back bolder than they were.
        assert np.abs(back - scaled[:500]).mean() < np.abs(grey - scaled[:500]).mean() / 10, name
    flat = keras.ops.convert_to_numpy(layer(np.full((1, 28, 28, 1), 0.5, "float32")))
    assert np.array_equal(flat, np.zeros_like(flat))  # a blank image stays blank, not NaN
    faint = keras.ops.convert_to_numpy(layer(scaled[:1] * 0.01))
    assert faint.max() == pytest.approx(0.01 * layer.MAX_GAIN * scaled[:1].max())


@pytest.mark.parametrize("name", ["best", "fast"])
def test_the_presets_models_read_grey_paper_straight_from_their_input(name, mnist):
    """A client that feeds the model directly (the SavedModel, an app) gets the same digit for
    a washed-out image as for the clean one; the book's presets stay as the book has them."""
    from cnnmnist import model, presets

    net = model.build(presets.get(name).model)
    images = mnist.test_images[:200]
    clean = net.predict(images.reshape(-1, 28, 28, 1).astype("float32"), verbose=0)
    washed = corruptions.apply("contrast", images).reshape(-1, 28, 28, 1).astype("float32")
    np.testing.assert_allclose(net.predict(washed, verbose=0), clean, rtol=0.02, atol=0.02)
    assert "stretch" not in [layer.name for layer in model.build(presets.get("seed").model).layers]
