"""The preset registry: named, frozen training recipes (stdlib only)."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnmnist.errors import UsageError

# The names in the model side's registries (cnnmnist.model), here so that presets and the
# command line can check and offer them without importing Keras (a test keeps both equal).
ARCHITECTURES = ("seed", "seed-layers", "mlp", "best", "fast")
OPTIMIZERS = (
    "adam",
    "adamw",
    "nadam",
    "adamax",
    "rmsprop",
    "rmsprop-tf1",
    "sgd",
    "adagrad",
    "adadelta",
    "lion",
)

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
SCHEDULES = ("constant", "one-cycle")
DATASETS = ("mnist", "fashion-mnist")
MAX_SEED = 2**32 - 1  # seeds are unsigned 32-bit numbers for numpy and TensorFlow alike
MAX_BATCH = 60_000  # a batch larger than the training set is no batch


@dataclass(frozen=True)
class Preset:
    """A model and its training recipe; every field can be overridden by a run."""

    name: str
    description: str
    model: str
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    epochs: int = 15
    batch_size: int = 100
    seed: int = 0
    validation_size: int = 5000
    train_size: int = 0  # 0: every image not held out for validation
    precision: str = "float32"  # the chapter's numbers are float32; see train.resolve_precision
    schedule: str = "constant"  # or "one-cycle": linear warm-up to learning_rate, cosine to 0
    label_smoothing: float = 0.0  # train against (1 - e) * one-hot + e / 10
    flagged_ones: float = 0.0  # this share of the training 1s drawn with a flag (digits only)
    box_scans: float = 0.0  # this share of the training digits stored as box-normalised scans
    clean_epochs: int = 0  # the last epochs (never the first) see the digits as given
    reference_accuracy: float | None = None
    reference: str = ""

    def with_overrides(self, **changes: Any) -> Preset:
        """Return a copy with the given fields replaced; None means 'not given'."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = sorted(set(changes) - set(TUNABLE))
        if unknown:
            raise UsageError(f"cannot override {', '.join(unknown)}; tunable: {', '.join(TUNABLE)}")
        changes = {k: _typed(k, v, TUNABLE[k]) for k, v in changes.items()}
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def validate(self) -> None:
        """Raise UsageError if a field holds a value no run can use."""
        if self.model not in ARCHITECTURES:
            raise UsageError(_unknown("model", self.model, ARCHITECTURES))
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(_unknown("optimizer", self.optimizer, OPTIMIZERS))
        if not self.learning_rate > 0:
            raise UsageError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.epochs < 1:
            raise UsageError(f"epochs must be at least 1, got {self.epochs}")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise UsageError(f"batch_size must be in 1..{MAX_BATCH}, got {self.batch_size}")
        if not 0 <= self.validation_size < 60000:
            raise UsageError(f"validation_size must be in 0..59999, got {self.validation_size}")
        if self.precision not in PRECISIONS:
            raise UsageError(_unknown("precision", self.precision, PRECISIONS))
        if self.schedule not in SCHEDULES:
            raise UsageError(_unknown("schedule", self.schedule, SCHEDULES))
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.flagged_ones <= 1:
            raise UsageError(f"flagged_ones must be in [0, 1], got {self.flagged_ones}")
        if not 0 <= self.box_scans <= 1:
            raise UsageError(f"box_scans must be in [0, 1], got {self.box_scans}")
        if self.clean_epochs < 0:
            raise UsageError(f"clean_epochs must be 0 or positive, got {self.clean_epochs}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        if self.train_size < 0:
            raise UsageError(f"train_size must be 0 (all) or positive, got {self.train_size}")

    def hyperparameters(self) -> dict[str, Any]:
        """The fields that decide what a run does (for metadata and tables)."""
        return {k: getattr(self, k) for k in ("model", *TUNABLE)}

    @property
    def first_clean_epoch(self) -> int:
        """The index of the first epoch trained without augmentation (`epochs`: none is)."""
        return max(1, self.epochs - self.clean_epochs) if self.clean_epochs else self.epochs


# Fields a config file or a CLI flag may set, with their types.
TUNABLE: dict[str, type] = {
    "optimizer": str,
    "learning_rate": float,
    "epochs": int,
    "batch_size": int,
    "seed": int,
    "validation_size": int,
    "train_size": int,
    "precision": str,
    "schedule": str,
    "label_smoothing": float,
    "flagged_ones": float,
    "box_scans": float,
    "clean_epochs": int,
}

_REGISTRY: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    """Add a preset to the registry (names are unique)."""
    if preset.name in _REGISTRY:
        raise ValueError(f"preset {preset.name!r} is already registered")
    preset.validate()
    _REGISTRY[preset.name] = preset
    return preset


def get(name: str) -> Preset:
    """Look a preset up by name; an unknown name is a usage error with a suggestion."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(_unknown("preset", name, list(_REGISTRY))) from None


def all_presets() -> list[Preset]:
    """Every registered preset, in registration order."""
    return list(_REGISTRY.values())


def _typed(key: str, value: Any, expected: type) -> Any:
    """Check a value's type (an int is accepted for a float); bools are never numbers."""
    if isinstance(value, bool) or not isinstance(
        value, expected | (int if expected is float else expected)
    ):
        raise UsageError(f"{key} must be {expected.__name__}, got {value!r}")
    return expected(value)


def _unknown(kind: str, name: str, choices: Any) -> str:
    shown = name if len(name) <= 40 else name[:37] + "..."  # a name may be anything, any size
    message = f"unknown {kind} {shown!r}"
    close = difflib.get_close_matches(name, list(choices), n=1) if len(name) <= 40 else []
    if close:
        message += f"; did you mean {close[0]!r}?"
    return message + f" (choose from: {', '.join(choices)})"


# Config files: a TOML table naming a preset and overriding its fields.
CONFIG_KEYS = {"preset": str, "dataset": str, **TUNABLE}
MAX_CONFIG_BYTES = 1 << 20


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML run file; unknown keys and wrongly typed values are usage errors."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise UsageError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes, not a run file")
    try:
        raw = tomllib.loads(text.decode("utf-8-sig"))  # an editor's byte-order mark is fine
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise UsageError(f"{path}: not a run file (nested too deeply)") from None
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise UsageError(
            f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(CONFIG_KEYS)}"
        )
    try:
        raw = {k: _typed(k, v, CONFIG_KEYS[k]) for k, v in raw.items()}
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None
    if "dataset" in raw and raw["dataset"] not in DATASETS:
        raise UsageError(f"{path}: {_unknown('dataset', raw['dataset'], DATASETS)}")
    try:  # each value's range, against a preset that is valid as registered
        dataclasses.replace(
            get(DEFAULT_PRESET), **{k: raw[k] for k in TUNABLE if k in raw}
        ).validate()
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None
    return raw


def resolve(
    preset: str | None, config: dict[str, Any] | None, **flags: Any
) -> tuple[Preset, dict[str, Any]]:
    """Preset defaults < config file < command-line flags; returns the recipe and run options.

    Flags that are None were not given and change nothing.
    """
    config = dict(config or {})
    name = preset or config.pop("preset", None) or DEFAULT_PRESET
    config.pop("preset", None)
    options = {"dataset": flags.pop("dataset", None) or config.pop("dataset", None) or "mnist"}
    recipe = get(name).with_overrides(**config).with_overrides(**flags)
    return recipe, options


def given(preset: str | None, config: dict[str, Any] | None, **flags: Any) -> dict[str, Any]:
    """Every recipe value the user gave (config file, then flags): a resumed run checks them
    against the recorded recipe instead of resolving a new one."""
    flags = {"preset": preset, **flags}
    return {**(config or {}), **{k: v for k, v in flags.items() if v is not None}}


# The reference chapter's test accuracies, by (preset, optimizer).
BOOK_ACCURACY = {
    ("seed", "adam"): 0.9926,  # chapter 7.2
    ("seed", "rmsprop"): 0.9896,
    ("seed", "rmsprop-tf1"): 0.9896,  # the same run, as TF1's RMSProp computed it
    ("seed-layers", "adam"): 0.9911,  # chapter 7.3
    ("mlp", "adam"): 0.981,  # chapter 6
}


def book_accuracy(preset: str, optimizer: str) -> float | None:
    """The book's test accuracy for a preset trained with an optimizer, if it gives one."""
    return BOOK_ACCURACY.get((preset, optimizer))


DEFAULT_PRESET = "seed"

register(
    Preset(
        name="seed",
        description="Chapter 7.2 CNN: two conv blocks, dense 256, N(0,0.01) weights, no biases",
        model="seed",
        optimizer="adam",
        learning_rate=1e-3,
        epochs=15,
        batch_size=100,
        reference_accuracy=book_accuracy("seed", "adam"),
        reference="chapter 7.2, Adam(1e-3), 15 epochs (RMSProp: 0.9896)",
    )
)
register(
    Preset(
        name="seed-layers",
        description="Chapter 7.3 tf.layers rewrite: dropout 0.7, VALID 2nd conv, Glorot + biases",
        model="seed-layers",
        reference_accuracy=book_accuracy("seed-layers", "adam"),
        reference="chapter 7.3, Adam(1e-3), 15 epochs",
    )
)
register(
    Preset(
        name="mlp",
        description="Chapter 6 dense baseline: 784-256-256-10 ReLU, Glorot + biases",
        model="mlp",
        reference_accuracy=book_accuracy("mlp", "adam"),
        reference="chapter 6 dense network",
    )
)
register(
    Preset(
        name="best",
        description="Beyond the book: 4 batch-normalised conv layers (the first and last at "
        "stride 2), half the training digits seen as users' images bring them (as `fast`), "
        "random affine augmentation (10 deg, 10% shift, 10% zoom), marks that are not the "
        "digit (specks, a line across, outlines, a band: 4 images of 128 each) and digits "
        "moved 3-6 px (2 of 128), half the 1s drawn with a flag, label smoothing 0.1, "
        "one-cycle Adam, 15 epochs on all 60,000 training images, the last 2 on the digits "
        "as given, bfloat16 where fast",
        model="best",
        optimizer="adam",
        learning_rate=3e-3,
        epochs=15,  # chosen on validation: benchmarks/results/choose_best.json
        batch_size=128,
        validation_size=0,  # chosen on the 5,000 held out; the final runs train on them too
        precision="auto",
        schedule="one-cycle",
        label_smoothing=0.1,
        flagged_ones=0.5,  # other writers' flagged 1s: docs/robustness.md
        clean_epochs=2,  # ending on the digits as given: docs/robustness.md
    )
)
register(
    Preset(
        name="fast",
        description="99% in seconds: 2 batch-normalised conv layers (5x5x32 at stride 2, "
        "3x3x32 pooled), half the training digits seen as users' images bring them (low "
        "resolution, thicker or thinner strokes), one-cycle Adam at batch 256, 2 epochs on all "
        "60,000 training images, bfloat16 where fast",
        model="fast",
        optimizer="adam",
        learning_rate=5e-3,
        epochs=2,
        batch_size=256,
        validation_size=0,
        precision="auto",
        schedule="one-cycle",
    )
)
