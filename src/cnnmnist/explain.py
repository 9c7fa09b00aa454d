"""`explain`: what each layer of the CNN does to a digit, and which pixels the answer rests on.

The network is read as the chapter teaches it: blocks that each start with a convolution (a
kernel slid over the image with a stride) or a pooling, then what follows it (batch norm,
ReLU), each leaving feature maps. The feature maps come from the checkpoint's TFLite copy
with its intermediate tensors kept (no TensorFlow), or from its Keras model where there is no
verified copy. Where the evidence lies is measured by occlusion: each pixel's patch painted
over with paper in turn, the drop in the class's log-probability is that patch's evidence for
it; a method that needs no gradients, runs on either engine and can be checked by occluding.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cnnmnist import checkpoint, runners
from cnnmnist.errors import CheckpointError, CnnmnistError
from cnnmnist.predict import expand_inputs
from cnnmnist.preprocess import STDIN, Prepared, has_ink, prepare

PATCH = 5  # pixels on a side of the square painted over when occluding (a stroke's width)
# Parts of a block, by Keras class name (a registered class's package prefix dropped).
FOLLOWERS = {"BatchNormalization": "batch norm", "FusedBatchNorm": "batch norm", "Activation": None}
MAX_CONFIG = 4 * 2**20  # bytes of a model.keras's config.json


@dataclass
class Block:
    """A convolution or a pooling and what follows it, in the chapter's vocabulary."""

    name: str  # the Keras layer it starts with: conv1, pool1
    kind: str  # "convolution" or "pooling"
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: str  # "same" or "valid"
    then: list[str] = field(default_factory=list)  # "batch norm", "relu"
    last: str = ""  # the layer whose output is the block's feature maps
    filters: int | None = None

    @property
    def what(self) -> str:
        """'conv 5x5, stride 2, same + batch norm + relu'."""
        op = "conv" if self.kind == "convolution" else "max pool"
        parts = [f"{op} {self.kernel[0]}x{self.kernel[1]}", f"stride {self.stride[0]}"]
        return ", ".join([*parts, self.padding]) + "".join(f" + {t}" for t in self.then)


def network_config(path: Path) -> dict[str, Any]:
    """The Keras config of a checkpoint's model.keras, read from the archive (no TensorFlow)."""
    archive = Path(path) / checkpoint.KERAS_MODEL
    try:
        with zipfile.ZipFile(archive) as z:
            if z.getinfo("config.json").file_size > MAX_CONFIG:
                raise CheckpointError(f"{archive}: its config.json is too large")
            return json.loads(z.read("config.json"))
    except (OSError, KeyError, zipfile.BadZipFile, ValueError, RecursionError) as e:
        raise CheckpointError(f"{archive}: cannot read the network's layers ({e})") from None


def blocks(config: dict[str, Any]) -> list[Block]:
    """The network's blocks, in order (none for a dense network)."""
    found: list[Block] = []
    for layer in config.get("config", {}).get("layers", []):
        kind, c = str(layer.get("class_name")).rpartition(">")[2], layer.get("config", {})
        name = c.get("name", "")
        if kind == "Conv2D" or kind.endswith("Pooling2D") and "Global" not in kind:
            conv = kind == "Conv2D"
            size = c["kernel_size"] if conv else c["pool_size"]
            block = Block(
                name,
                "convolution" if conv else "pooling",
                tuple(size),
                tuple(c.get("strides") or size),
                c.get("padding", "valid"),
                last=name,
                filters=c.get("filters"),
            )
            if conv and c.get("activation") not in (None, "linear"):
                block.then.append(c["activation"])
            found.append(block)
        elif found and kind in FOLLOWERS and found[-1].last == _previous(config, name):
            found[-1].then.append(FOLLOWERS[kind] or c.get("activation", "activation"))
            found[-1].last = name
    return found


def _previous(config: dict[str, Any], name: str) -> str:
    """The layer before `name` in the config's order."""
    names = [layer.get("config", {}).get("name") for layer in config["config"]["layers"]]
    index = names.index(name)
    return names[index - 1] if index else ""


class TFLiteMaps:
    """Feature maps from the TFLite copy, its intermediate tensors kept."""

    def __init__(self, path: Path, found: list[Block]) -> None:
        import warnings

        from cnnmnist.runners import interpreter

        with warnings.catch_warnings():  # LiteRT warns that kept tensors cost memory: wanted
            warnings.simplefilter("ignore")
            self._interpreter = interpreter(path, preserve=True)
        details = self._interpreter.get_tensor_details()
        self._tensors = [_tensor_of(block, details, path) for block in found]
        self._input = self._interpreter.get_input_details()[0]["index"]

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        it = self._interpreter
        it.resize_tensor_input(self._input, list(pixels.shape))
        it.allocate_tensors()
        it.set_tensor(self._input, pixels.astype(np.float32))
        it.invoke()
        return [it.get_tensor(index) for index in self._tensors]


def _tensor_of(block: Block, details: list[dict], path: Path) -> int:
    """The TFLite tensor holding a block's output: named after its last layer (the converter
    keeps Keras's layer names, `model_1/conv1_relu_1/Relu`), with a batch dimension."""
    pattern = re.compile(rf"(^|/){re.escape(block.last)}(_\d+)?/")
    found = [
        d
        for d in details
        if len(d["shape"]) == 4
        and d["shape"][0] == 1
        and any(pattern.search(part) for part in d["name"].split(";"))
    ]
    if not found:
        raise CheckpointError(f"{path}: no tensor for the layer {block.last!r} in the TFLite copy")
    return max(found, key=lambda d: d["index"])["index"]  # the activation, not an input to it


class KerasMaps:
    """Feature maps from the Keras model (imports TensorFlow): the network cut after each
    block, as keras.Model(inputs, layer.output) does; in float32, as the checkpoint serves it
    (a network trained in mixed precision is saved with its bfloat16 or float16 policy)."""

    def __init__(self, path: Path, found: list[Block]) -> None:
        import keras

        net = float32_network(Path(path) / checkpoint.KERAS_MODEL)
        outputs = [net.get_layer(block.last).output for block in found]
        self._cut = keras.Model(net.inputs, outputs) if outputs else None

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        if self._cut is None:
            return []
        maps = self._cut(pixels.astype(np.float32), training=False)
        return [np.asarray(m) for m in (maps if isinstance(maps, list) else [maps])]


def float32_network(path: Path):
    """A checkpoint's model.keras as a float32 Keras model (its own twin when it was saved
    with a mixed-precision policy). Imports TensorFlow."""
    import keras

    from cnnmnist import model

    net = keras.saving.load_model(path, compile=False)
    if all(layer.dtype_policy.name == "float32" for layer in net.layers):
        return net
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        twin = model.build(net.name)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    twin.set_weights(net.get_weights())
    return twin


class Explainer:
    """A checkpoint opened for explaining: its runner (what predict uses) and its layers."""

    def __init__(self, model_dir: Path, warn=lambda message: None, runner=None) -> None:
        ckpt = checkpoint.read(model_dir)
        self.runner = runner or runners.load(ckpt, warn)  # a server passes the one it has
        self.blocks = blocks(network_config(ckpt.path))
        if isinstance(self.runner, runners.TFLite):
            self.maps = TFLiteMaps(self.runner.path, self.blocks)
        else:
            self.maps = KerasMaps(ckpt.path, self.blocks)
        self.preset = ckpt.metadata.get("preset")

    def __call__(self, prepared: Prepared) -> dict[str, Any]:
        """The explanation of one prepared input (its pixels must hold ink)."""
        pixels = prepared.pixels.astype(np.float32).reshape(1, 28, 28, 1)
        row = self.runner.probabilities(pixels)[0]
        order = np.argsort(-row, kind="stable")
        digit, runner_up = int(order[0]), int(order[1])
        evidence = occlusion(self.runner.probabilities, prepared.pixels, (digit, runner_up))
        maps = self.maps(pixels)
        layers = []
        for block, activations in zip(self.blocks, maps, strict=True):
            layers.append(
                {
                    "name": block.name,
                    "kind": block.kind,
                    "kernel": list(block.kernel),
                    "stride": list(block.stride),
                    "padding": block.padding,
                    "then": block.then,
                    "what": block.what,
                    "shape": list(activations.shape[1:]),
                    "maps": activations[0],
                }
            )
        return {
            "digit": digit,
            "confidence": float(row[digit]),
            "runner_up": runner_up,
            "probabilities": [float(v) for v in row],
            "input": prepared.pixels,
            "saliency": evidence[0],
            "saliency_runner_up": evidence[1],
            "layers": layers,
        }


def occlusion(probabilities, pixels: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """Evidence maps [len(classes), 28, 28]: for each pixel, the mean drop in each class's
    log-odds when a PATCH x PATCH square covering it is painted over with paper (one batch
    of 784 occluded copies). Larger = more evidence for the class. Log-odds, not the
    probability: a confident answer's probability hardly moves from 1 when one stroke goes,
    its odds do."""
    image = np.asarray(pixels, np.float32).reshape(28, 28)
    copies = np.repeat(image[None], 28 * 28, axis=0)
    half = PATCH // 2
    for k in range(28 * 28):
        y, x = divmod(k, 28)
        copies[k, max(0, y - half) : y + half + 1, max(0, x - half) : x + half + 1] = 0
    base = _log_odds(probabilities(image.reshape(1, 28, 28, 1)), classes)
    occluded = _log_odds(probabilities(copies.reshape(-1, 28, 28, 1)), classes)
    drops = (base - occluded).T.reshape(len(classes), 28, 28)
    # A pixel's evidence: the mean over the patches that cover it.
    return np.stack([cv2.blur(d, (PATCH, PATCH), borderType=cv2.BORDER_CONSTANT) for d in drops])


def _log_odds(probabilities: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """log(p_c / sum of the other classes' p) for each row and class [N, len(classes)]; the
    others summed directly, since p_c may round to exactly 1 in float32."""
    p = np.asarray(probabilities, np.float64)
    tiny = 1e-30
    return np.stack(
        [np.log(p[:, c] + tiny) - np.log(p.sum(axis=1) - p[:, c] + tiny) for c in classes], axis=1
    )


def explain(
    inputs: list[str], model_dir: Path, stdin: bytes | None = None, warn=lambda message: None
) -> list[dict[str, Any]]:
    """One explanation per input (files, folders, '-'), in order: the prepared input, the
    answer, the evidence maps and every block's feature maps; or why there is none."""
    explainer = Explainer(model_dir, warn)
    results = []
    for source in expand_inputs(inputs):
        prepared = prepare(source, stdin if source == STDIN else None, keep_image=True)
        result: dict[str, Any] = {
            "file": "<stdin>" if source == STDIN else source,
            "engine": explainer.runner.name,
            "preset": explainer.preset,
            "warnings": list(prepared.warnings),
            "error": prepared.error,
            "original": prepared.grey,
        }
        if has_ink(prepared):
            result |= explainer(prepared)
        elif prepared.error is None:
            result["error"] = "no ink found: nothing to explain"
        results.append(result)
    return results


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """A result as `explain --json` prints it: arrays as lists, the original image left out,
    feature maps rounded (4 decimals), channels last."""
    out = {k: v for k, v in result.items() if k != "original"} | _pictures(result, 4)
    if "layers" in out:
        out["layers"] = [
            layer | {"maps": np.round(layer["maps"].astype(np.float64), 4).tolist()}
            for layer in out["layers"]
        ]
    return out


def _pictures(result: dict[str, Any], decimals: int) -> dict[str, list]:
    """A result's 28x28 pictures (the input and the evidence maps) as rounded lists."""
    return {
        key: np.round(np.asarray(result[key], np.float64), decimals).tolist()
        for key in ("input", "saliency", "saliency_runner_up")
        if key in result
    }


def kernels(model_dir: Path) -> list[tuple[str, np.ndarray]]:
    """The convolution layers' kernels [kh, kw, in, out] as the checkpoint's Keras model holds
    them, by layer name, in order; a dense network has none (an error saying so)."""
    ckpt = checkpoint.read(model_dir)
    convolutions = [b.name for b in blocks(network_config(ckpt.path)) if b.kind == "convolution"]
    if not convolutions:
        raise CnnmnistError(
            f"{model_dir}: {ckpt.metadata.get('preset')} is a dense network: it has no "
            "convolution kernels to draw"
        )
    net = float32_network(ckpt.path / checkpoint.KERAS_MODEL)
    return [(name, np.asarray(net.get_layer(name).kernel)) for name in convolutions]


def picture_paths(plot: Path, results: list[dict[str, Any]]) -> list[Path]:
    """Where each result's picture goes: `plot` itself for one image; for several, the
    image's name after the plot's (digits-seven.png, digits-four.png), numbered where two
    names would clash."""
    if len(results) == 1:
        return [plot]
    stems = [re.sub(r"[^\w.-]+", "_", Path(r["file"]).stem) or "stdin" for r in results]
    clash = {s for s in stems if stems.count(s) > 1}
    return [
        plot.with_name(f"{plot.stem}-{stem}{f'-{k + 1}' if stem in clash else ''}{plot.suffix}")
        for k, stem in enumerate(stems)
    ]


def for_page(result: dict[str, Any], layers: int = 2) -> dict[str, Any]:
    """An explanation as the page draws it (POST /explain): the numbers of `to_json` for the
    input and the evidence (3 decimals), and the first `layers` blocks' feature maps as one
    grey PNG each (a data URL: each map scaled to its own range, 16 to a row)."""
    import base64
    import io

    from PIL import Image

    from cnnmnist.plots import mosaic

    out = {k: v for k, v in result.items() if k not in ("original", "layers")}
    out |= _pictures(result, 3)
    out["layers"] = []
    for layer in result["layers"][:layers]:
        tile = np.nan_to_num(mosaic(layer["maps"]), nan=1.0)  # white between the maps
        png = io.BytesIO()
        Image.fromarray(np.round(tile * 255).astype(np.uint8)).save(png, format="PNG")
        encoded = base64.b64encode(png.getvalue()).decode("ascii")
        out["layers"].append(
            {k: v for k, v in layer.items() if k != "maps"}
            | {"mosaic": f"data:image/png;base64,{encoded}"}
        )
    return out


def network_summary(model_dir: Path) -> dict[str, Any]:
    """What `model.summary()` shows of a checkpoint's network (each layer's name, kind,
    output shape and parameters, and the totals) and its serving signature as the SavedModel
    declares it (`saved_model_cli show`). Imports TensorFlow."""
    import tensorflow as tf

    ckpt = checkpoint.read(model_dir)
    net = float32_network(ckpt.path / checkpoint.KERAS_MODEL)
    layers = [
        {
            "name": layer.name,
            "kind": type(layer).__name__,
            "output": [None if d is None else int(d) for d in layer.output.shape],
            "parameters": int(layer.count_params()),
        }
        for layer in net.layers
    ]
    trainable = int(sum(np.prod(w.shape) for w in net.trainable_weights))
    function = tf.saved_model.load(str(ckpt.path)).signatures[checkpoint.SIGNATURE]

    def tensors(specs) -> dict[str, Any]:
        return {
            name: {
                "dtype": spec.dtype.name,
                "shape": [d if d is not None else -1 for d in spec.shape],
            }
            for name, spec in specs.items()
        }

    return {
        "layers": layers,
        "parameters": int(net.count_params()),
        "trainable_parameters": trainable,
        "signature": {
            "name": checkpoint.SIGNATURE,
            "inputs": tensors(function.structured_input_signature[1]),
            "outputs": tensors(function.structured_outputs),
        },
    }
