"""`explain` and `inspect --filters`: the feature maps are the network's own (an independent
cut of the Keras model agrees), the kernels are the checkpoint's weights, and the evidence
maps point at the pixels the answer rests on (occluding them costs more than occluding as
many other ink pixels)."""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cnnmnist.model  # noqa: F401 - registers the Keras classes model.keras names
from cnnmnist import checkpoint, explain, presets, runners, training
from cnnmnist.cli import cli
from cnnmnist.preprocess import Prepared

TOP = 20  # pixels occluded in the evidence check: about a stroke's length
DIGITS = 200


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, mnist_dir, trained):
    """`seed` (the shared one-epoch checkpoint) and `best` and `mlp` trained for a few dozen
    steps: enough to read digits, which is all the checks below need."""
    out = {"seed": trained.checkpoint}
    for name in ("best", "mlp"):
        recipe = presets.get(name).with_overrides(epochs=1, train_size=40 * 128, validation_size=0)
        target = tmp_path_factory.mktemp(name) / "ckpt"
        training.run(recipe, training.Options(data_dir=mnist_dir, out=target))
        out[name] = target
    return out


def _prepared(pixels: np.ndarray) -> Prepared:
    return Prepared("digit", pixels.astype(np.uint8))


@pytest.mark.parametrize("preset", ["seed", "best"])
def test_feature_maps_are_what_a_keras_model_cut_at_each_layer_computes(checkpoints, mnist, preset):
    path = checkpoints[preset]
    explainer = explain.Explainer(path)
    assert explainer.runner.name == "tflite"  # maps from the TFLite copy's kept tensors
    net = explain.float32_network(path / checkpoint.KERAS_MODEL)
    assert net.dtype_policy.name == "float32"  # as served, whatever it trained in
    pixels = mnist.test_images[:3].astype(np.float32).reshape(-1, 28, 28, 1)
    for image in pixels:
        result = explainer(_prepared(image[:, :, 0]))
        assert [layer["name"] for layer in result["layers"]] == [b.name for b in explainer.blocks]
        for layer, block in zip(result["layers"], explainer.blocks, strict=True):
            cut = keras.Model(net.inputs, net.get_layer(block.last).output)
            expected = np.asarray(cut(image[None], training=False))[0]
            assert layer["maps"].shape == expected.shape
            np.testing.assert_allclose(layer["maps"], expected, atol=2e-3 * max(1, expected.max()))


def test_the_layers_are_named_in_the_chapters_words(checkpoints):
    blocks = explain.blocks(explain.network_config(checkpoints["seed"]))
    assert [(b.name, b.kind, b.kernel, b.stride, b.padding) for b in blocks] == [
        ("conv1", "convolution", (3, 3), (1, 1), "same"),
        ("pool1", "pooling", (2, 2), (2, 2), "same"),
        ("conv2", "convolution", (3, 3), (1, 1), "same"),
        ("pool2", "pooling", (2, 2), (2, 2), "same"),
    ]
    best = explain.blocks(explain.network_config(checkpoints["best"]))
    assert best[0].what == "conv 5x5, stride 2, same + batch norm + relu"
    assert explain.blocks(explain.network_config(checkpoints["mlp"])) == []


def test_without_the_tflite_copy_the_keras_model_gives_the_same_maps(checkpoints, mnist, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoints["seed"], copy)
    (copy / checkpoint.TFLITE).unlink()
    image = mnist.test_images[0]
    fast = explain.Explainer(checkpoints["seed"])(_prepared(image))
    slow = explain.Explainer(copy)(_prepared(image))
    assert slow["digit"] == fast["digit"]
    for a, b in zip(fast["layers"], slow["layers"], strict=True):
        np.testing.assert_allclose(a["maps"], b["maps"], atol=2e-3 * max(1, b["maps"].max()))


@pytest.mark.parametrize("preset", ["seed", "best"])
def test_occluding_the_top_evidence_costs_more_than_occluding_other_ink(checkpoints, mnist, preset):
    model = runners.load(checkpoint.read(checkpoints[preset]))
    rng = np.random.default_rng(0)
    top_drop, random_drop, wins = [], [], 0
    for image in mnist.test_images[:DIGITS]:
        row = model.probabilities(image.reshape(1, 28, 28, 1))[0]
        digit = int(row.argmax())
        evidence = explain.occlusion(model.probabilities, image, (digit,))[0]
        ink = np.flatnonzero(image.ravel() > 64)
        ranked = ink[np.argsort(-evidence.ravel()[ink])][:TOP]
        chosen = rng.choice(ink, size=min(TOP, len(ink)), replace=False)
        drops = []
        for hidden in (ranked, chosen):
            copy = image.astype(np.float32).ravel().copy()
            copy[hidden] = 0
            drops.append(row[digit] - model.probabilities(copy.reshape(1, 28, 28, 1))[0][digit])
        top_drop.append(drops[0])
        random_drop.append(drops[1])
        wins += drops[0] > drops[1]
    assert np.mean(top_drop) > 2 * np.mean(random_drop), (np.mean(top_drop), np.mean(random_drop))
    assert wins > DIGITS * 0.7


def test_kernels_are_the_checkpoints_weights(checkpoints):
    # The TFLite copy holds the first layer's kernel too, transposed, with the model's 1/255
    # scaling folded in by the converter: an independent reading of the same weights.
    name, kernel = explain.kernels(checkpoints["seed"])[0]
    assert name == "conv1" and kernel.shape == (3, 3, 1, 32)
    interpreter = runners.interpreter(checkpoints["seed"] / checkpoint.TFLITE, preserve=True)
    interpreter.allocate_tensors()
    tensors = [
        d for d in interpreter.get_tensor_details() if "conv1" in d["name"] and len(d["shape"]) == 4
    ]
    stored = next(interpreter.get_tensor(d["index"]) for d in tensors if d["shape"][0] == 32)
    np.testing.assert_allclose(
        np.transpose(stored, (1, 2, 3, 0)) * 255, kernel, rtol=1e-4, atol=1e-6
    )


def _digit_file(mnist, path, k):
    Image.fromarray(255 - mnist.test_images[k]).resize((140, 140)).save(path)
    return path


def test_explain_json_gives_what_people_plot_their_own_from(checkpoints, mnist, tmp_path):
    image = _digit_file(mnist, tmp_path / "seven.png", 0)
    result = CliRunner().invoke(
        cli, ["explain", str(image), "--model", str(checkpoints["seed"]), "--json"]
    )
    assert result.exit_code == 0, result.output
    (answer,) = json.loads(result.stdout)
    assert answer["file"] == str(image) and answer["digit"] == 7
    assert np.array(answer["input"]).shape == (28, 28)
    assert np.array(answer["saliency"]).shape == (28, 28)
    assert len(answer["probabilities"]) == 10
    assert [(layer["name"], layer["kind"]) for layer in answer["layers"]][:2] == [
        ("conv1", "convolution"),
        ("pool1", "pooling"),
    ]
    assert all({"kernel", "stride", "shape", "maps"} <= set(layer) for layer in answer["layers"])
    assert np.array(answer["layers"][1]["maps"]).shape == (14, 14, 32)


def test_explain_draws_one_picture_per_image_named_apart(checkpoints, mnist, tmp_path):
    seven = _digit_file(mnist, tmp_path / "seven.png", 0)
    two = _digit_file(mnist, tmp_path / "two.png", 1)
    plot = tmp_path / "why.png"
    result = CliRunner().invoke(
        cli,
        ["explain", str(seven), str(two), "--model", str(checkpoints["best"]), "--plot", str(plot)],
    )
    assert result.exit_code == 0, result.output
    assert "conv 5x5, stride 2" in result.stdout and "evidence for" in result.stdout
    pictures = sorted(p.name for p in tmp_path.glob("why-*.png"))
    assert pictures == ["why-seven.png", "why-two.png"]
    for name in pictures:
        with Image.open(tmp_path / name) as drawn:
            assert drawn.size[0] > 800 and drawn.size[1] > 600
            assert len(set(drawn.convert("L").getdata())) > 50  # drawn, not blank


def test_a_dense_network_says_it_has_no_feature_maps(checkpoints, mnist, tmp_path):
    image = _digit_file(mnist, tmp_path / "seven.png", 0)
    result = CliRunner().invoke(cli, ["explain", str(image), "--model", str(checkpoints["mlp"])])
    assert result.exit_code == 0, result.output
    assert "a dense network: no convolutions, so no feature maps" in result.stdout
    assert "evidence for" in result.stdout  # its evidence is still shown
    filters = CliRunner().invoke(
        cli, ["inspect", str(checkpoints["mlp"]), "--filters", str(tmp_path / "k.png")]
    )
    assert filters.exit_code == 1
    assert "is a dense network: it has no convolution kernels" in filters.output
    assert not (tmp_path / "k.png").exists()


def test_inspect_filters_draws_the_kernels(checkpoints, tmp_path):
    picture = tmp_path / "kernels.png"
    result = CliRunner().invoke(
        cli, ["inspect", str(checkpoints["best"]), "--filters", str(picture)]
    )
    assert result.exit_code == 0, result.output
    assert "conv1, conv2, conv3, conv4" in result.stderr
    with Image.open(picture) as drawn:
        assert len(set(drawn.convert("L").getdata())) > 50


def test_a_blank_image_is_not_explained(checkpoints, tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("L", (50, 50), 255).save(blank)
    result = CliRunner().invoke(cli, ["explain", str(blank), "--model", str(checkpoints["seed"])])
    assert result.exit_code == 1
    assert "no ink found: nothing to explain" in result.stdout
    assert "1 of 1 inputs could not be explained" in result.output
