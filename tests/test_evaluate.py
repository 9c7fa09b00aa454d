"""`evaluate` and `inspect`: the report agrees with the SavedModel's own outputs; bad input."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import without_package
from PIL import Image

from cnnmnist import checkpoint, evaluate, sheets
from cnnmnist.cli import cli


@pytest.fixture(scope="module")
def report(trained, mnist_dir, tmp_path_factory):
    png = tmp_path_factory.mktemp("errors") / "mistakes.png"
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            str(trained.checkpoint),
            "--data-dir",
            str(mnist_dir),
            "--json",
            "--errors",
            str(png),
        ],
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), png


def test_accuracy_matches_an_independent_computation(report, trained, mnist):
    import tensorflow as tf

    rep, _ = report
    fn = tf.saved_model.load(str(trained.checkpoint)).signatures["serving_default"]
    pixels = tf.constant(mnist.test_images.reshape(-1, 28, 28, 1).astype(np.float32))
    probs = fn(pixels=pixels)["probabilities"].numpy()
    predicted = probs.argmax(axis=1)
    assert rep["n"] == 10000 and rep["split"] == "test" and rep["dataset"] == "mnist"
    assert rep["accuracy"] == pytest.approx(
        float((predicted == mnist.test_labels).mean()), abs=1e-12
    )
    expected_loss = -np.log(np.clip(probs[np.arange(10000), mnist.test_labels], 1e-12, 1)).mean()
    assert rep["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert rep["accuracy"] == pytest.approx(trained.test_accuracy, abs=1e-6)  # what train reported


def test_confusion_matrix_and_per_class_agree(report, mnist):
    rep, _ = report
    matrix = np.array(rep["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == rep["n"]
    assert np.trace(matrix) / rep["n"] == pytest.approx(rep["accuracy"])
    assert list(matrix.sum(axis=1)) == list(np.bincount(mnist.test_labels, minlength=10))
    for row in rep["per_class"]:
        k = row["label"]
        assert row["support"] == matrix[k].sum()
        assert row["precision"] == pytest.approx(matrix[k, k] / matrix[:, k].sum())
        assert row["recall"] == pytest.approx(matrix[k, k] / matrix[k].sum())
        p, r = row["precision"], row["recall"]
        assert row["f1"] == pytest.approx(2 * p * r / (p + r))
    top = rep["most_confused"][0]
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    assert top["count"] == off.max() and matrix[top["true"], top["predicted"]] == off.max()


def test_confidence_interval_contains_the_accuracy(report):
    rep, _ = report
    low, high = rep["accuracy_ci95"]
    assert 0 < low < rep["accuracy"] < high < 1
    assert high - low < 0.01  # n = 10,000 at ~97%: about +/- 0.35 points


def test_wilson_against_known_values():
    # Wilson 95% interval for 81/263 (Wikipedia's worked example style): computed by hand.
    low, high = evaluate.wilson(81, 263)
    assert low == pytest.approx(0.2553, abs=1e-4) and high == pytest.approx(0.3662, abs=1e-4)
    assert evaluate.wilson(0, 10)[0] == pytest.approx(0.0) and evaluate.wilson(10, 10)[
        1
    ] == pytest.approx(1.0)


def test_errors_png_is_a_valid_picture_of_the_expected_size(report):
    rep, png = report
    mistakes = rep["n"] - int(round(rep["accuracy"] * rep["n"]))
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size == sheets.size(min(36, mistakes))


def test_terminal_report(trained, mnist_dir):
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            str(trained.checkpoint),
            "--data-dir",
            str(mnist_dir),
            "--split",
            "validation",
        ],
    )
    assert result.exit_code == 0, result.output
    for text in (
        "accuracy",
        "95% CI",
        "confusion matrix",
        "per class",
        "most confused",
        "validation",
    ):
        assert text in result.stdout


def test_other_dataset_is_allowed_with_a_warning(trained, fashion_mnist_dir):
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            str(trained.checkpoint),
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            str(fashion_mnist_dir),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "trained on mnist" in result.stderr
    assert json.loads(result.stdout)["dataset"] == "fashion-mnist"


def test_inspect_summary_and_json(trained):
    runner = CliRunner()
    summary = runner.invoke(cli, ["inspect", str(trained.checkpoint)])
    assert summary.exit_code == 0
    assert (
        "seed" in summary.stdout and "history" in summary.stdout and "tensorflow" in summary.stdout
    )
    # The network layer by layer, as model.summary() shows it, and the serving signature.
    assert "conv1" in summary.stdout and "Conv2D" in summary.stdout
    assert "serving signature 'serving_default'" in summary.stdout
    assert "[-1, 28, 28, 1]" in summary.stdout and "[-1, 10]" in summary.stdout
    raw = runner.invoke(cli, ["inspect", str(trained.checkpoint), "--json"])
    report = json.loads(raw.stdout)
    network = report.pop("network")
    assert report == checkpoint.read(trained.checkpoint).metadata
    import keras

    import cnnmnist.model  # noqa: F401 - registers the Keras classes model.keras names

    net = keras.saving.load_model(trained.checkpoint / checkpoint.KERAS_MODEL)
    assert network["parameters"] == net.count_params()
    assert [layer["name"] for layer in network["layers"]] == [layer.name for layer in net.layers]
    assert network["signature"]["inputs"]["pixels"] == {
        "dtype": "float32",
        "shape": [-1, 28, 28, 1],
    }
    assert network["signature"]["outputs"]["probabilities"]["shape"] == [-1, 10]


def broken(tmp_path, trained, how):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained.checkpoint, ckpt)
    how(ckpt)
    return ckpt


def _newer(ckpt):
    meta = json.loads((ckpt / "cnnmnist.json").read_text())
    meta["format_version"] = checkpoint.FORMAT_VERSION + 1
    (ckpt / "cnnmnist.json").write_text(json.dumps(meta))


def _truncate_variables(ckpt):
    data = next((ckpt / "variables").glob("variables.data-*"))
    data.write_bytes(data.read_bytes()[:1000])


@pytest.mark.parametrize(
    "how, message",
    [
        (lambda c: (c / "saved_model.pb").unlink(), "missing saved_model.pb"),
        (lambda c: (c / "cnnmnist.json").write_text("{not json"), "corrupted metadata"),
        (_newer, "newer than this cnnmnist reads"),
        (_truncate_variables, "cannot be loaded"),
        (lambda c: (c / "saved_model.pb").write_bytes(b"garbage"), "cannot be loaded"),
    ],
)
def test_bad_checkpoints_exit_1_naming_the_path(tmp_path, trained, mnist_dir, how, message):
    ckpt = broken(tmp_path, trained, how)
    result = CliRunner().invoke(cli, ["evaluate", str(ckpt), "--data-dir", str(mnist_dir)])
    assert result.exit_code == 1, result.output
    assert message in result.output and str(ckpt) in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["evaluate", "inspect"])
def test_not_a_checkpoint(tmp_path, command):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("hi")
    for target, message in (
        ("empty", "not a cnnmnist checkpoint"),
        ("file.txt", "not a checkpoint directory"),
        ("nowhere", "no such checkpoint directory"),
    ):
        result = CliRunner().invoke(cli, [command, str(tmp_path / target)])
        assert result.exit_code == 1 and message in result.output, result.output


def test_evaluate_and_inspect_default_to_ckpt_like_predict(trained, tmp_path, monkeypatch):
    shutil.copytree(trained.checkpoint, tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    inspected = CliRunner().invoke(cli, ["inspect", "--json"])
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.stdout)["preset"] == "seed"
    evaluated = CliRunner().invoke(cli, ["evaluate", "--json", "--split", "validation"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["checkpoint"] == "ckpt"


def test_inspect_plot_draws_the_learning_curves(trained, tmp_path):
    from cnnmnist import plots

    target = tmp_path / "curves.png"
    result = CliRunner().invoke(cli, ["inspect", str(trained.checkpoint), "--plot", str(target)])
    assert result.exit_code == 0, result.output
    image = Image.open(target)
    assert image.format == "PNG"
    assert image.size == (plots.SIZE[0] * plots.DPI, plots.SIZE[1] * plots.DPI)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50  # axes, lines, markers and text: not blank
    red = (pixels[:, 0] > 200) & (pixels[:, 1] < 80) & (pixels[:, 2] < 80)
    assert red.sum() > 20  # the test result's red star is there


def test_inspect_plot_without_matplotlib_says_how_to_get_it(trained, tmp_path, monkeypatch):
    without_package(monkeypatch, "matplotlib")
    result = CliRunner().invoke(
        cli, ["inspect", str(trained.checkpoint), "--plot", str(tmp_path / "c.png")]
    )
    assert result.exit_code == 1 and "pip install 'cnnmnist[plot]'" in result.output
    assert not (tmp_path / "c.png").exists()


def test_evaluate_plot_draws_the_confusion_matrix(trained, tmp_path, mnist_dir):
    from cnnmnist import plots

    target = tmp_path / "confusion.png"
    args = ["evaluate", str(trained.checkpoint), "--split", "validation"]
    result = CliRunner().invoke(cli, [*args, "--data-dir", str(mnist_dir), "--plot", str(target)])
    assert result.exit_code == 0, result.output
    image = Image.open(target)
    size = plots.CONFUSION_SIZE
    assert image.size == (size[0] * plots.DPI, size[1] * plots.DPI)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    grey = (np.abs(pixels - pixels.mean(axis=1, keepdims=True)).max(axis=1) < 8) & (
        pixels[:, 0] < 140
    )
    assert grey.sum() > 1000  # the diagonal's dark grey cells: most of every class is right
    # The largest mistake is drawn dark red on its own scale, however few it counts: a
    # cell of it shows at a glance (the row-share colours of before left it near white).
    dark_red = (pixels[:, 0] > 90) & (pixels[:, 1] < 40) & (pixels[:, 2] < 50)
    assert dark_red.sum() > 300
    assert len(np.unique(pixels, axis=0)) > 50  # cells, counts, axes and the colour bar


def test_evaluate_plot_does_not_go_with_corruptions(trained, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["evaluate", str(trained.checkpoint), "--corruptions", "--plot", str(tmp_path / "p.png")],
    )
    # A valid picture name: the refusal is the combination's, not the name's (--plot checks
    # its suffix before any work).
    assert result.exit_code == 2 and "--plot" in result.output
    assert "not with --corruptions" in result.output
