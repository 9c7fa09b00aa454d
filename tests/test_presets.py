import dataclasses

import pytest
from click.testing import CliRunner

from cnnmnist import model, presets
from cnnmnist.cli import cli
from cnnmnist.errors import UsageError
from cnnmnist.model import optimizers


def test_reference_presets_are_registered_with_reference_accuracy():
    seed = presets.get("seed")
    assert (seed.optimizer, seed.learning_rate, seed.batch_size, seed.epochs) == (
        "adam",
        1e-3,
        100,
        15,
    )
    assert seed.validation_size == 5000
    assert seed.reference_accuracy == pytest.approx(0.9926)
    assert presets.get("seed-layers").reference_accuracy == pytest.approx(0.9911)
    assert presets.get("mlp").reference_accuracy == pytest.approx(0.981)
    assert presets.DEFAULT_PRESET == "seed"


def test_presets_are_frozen():
    with pytest.raises(AttributeError):
        presets.get("seed").epochs = 3


def test_unknown_preset_suggests_the_closest_name():
    with pytest.raises(UsageError, match="did you mean 'seed-layers'"):
        presets.get("seed-layer")


def test_unknown_preset_is_a_usage_error_on_the_cli():
    result = CliRunner().invoke(cli, ["train", "--preset", "seeed"])
    assert result.exit_code == 2
    assert "did you mean 'seed'" in result.output


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError):
        presets.register(presets.get("seed"))


def test_overrides_replace_only_given_fields():
    base = presets.get("seed")
    changed = base.with_overrides(epochs=3, learning_rate=None, optimizer="rmsprop")
    assert changed.epochs == 3 and changed.optimizer == "rmsprop"
    assert changed.learning_rate == base.learning_rate and changed.batch_size == base.batch_size
    assert base.epochs == 15  # the registered preset is untouched


@pytest.mark.parametrize(
    "change, message",
    [
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"learning_rate": -1.0}, "learning_rate must be positive"),
        ({"optimizer": "adan"}, "did you mean 'adam'"),
        ({"epochs": "3"}, "epochs must be int"),
        ({"batch_size": True}, "batch_size must be int"),
        ({"model": "mlp"}, "cannot override model"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
        ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 1\)"),
        ({"clean_epochs": -1}, "clean_epochs must be 0 or positive"),
    ],
)
def test_bad_overrides_are_usage_errors(change, message):
    with pytest.raises(UsageError, match=message):
        presets.get("seed").with_overrides(**change)


def test_config_then_flags_precedence(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('preset = "seed"\noptimizer = "rmsprop"\nepochs = 4\nlearning_rate = 1\n')
    recipe, options = presets.resolve(None, presets.load_config(config), epochs=2, optimizer=None)
    assert recipe.optimizer == "rmsprop"  # from the file
    assert recipe.epochs == 2  # the flag wins
    assert recipe.learning_rate == 1.0 and isinstance(recipe.learning_rate, float)
    assert options["dataset"] == "mnist"


def test_preset_flag_overrides_the_config_preset(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('preset = "mlp"\ndataset = "fashion-mnist"\n')
    recipe, options = presets.resolve("seed-layers", presets.load_config(config))
    assert recipe.name == "seed-layers" and options["dataset"] == "fashion-mnist"


@pytest.mark.parametrize(
    "text, message",
    [
        ("epochz = 3\n", "unknown key"),
        ('epochs = "many"\n', "epochs must be int"),
        ("epochs = [\n", "not valid TOML"),
        ('dataset = "cifar"\n', "unknown dataset"),
    ],
)
def test_bad_config_files_name_the_file(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(UsageError, match=message) as info:
        presets.load_config(config)
    assert str(config) in str(info.value)


def test_bad_config_on_the_cli_exits_2(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("colour = 1\n")
    result = CliRunner().invoke(cli, ["train", "--config", str(config)])
    assert result.exit_code == 2 and "unknown key(s) colour" in result.output


def test_shipped_configs_load_and_resolve():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
    names = {c.name for c in configs}
    assert {"seed-adam.toml", "seed-rmsprop.toml", "seed-layers.toml", "mlp.toml"} <= names
    for config in configs:
        recipe, _ = presets.resolve(None, presets.load_config(config))
        recipe.validate()
    rmsprop, _ = presets.resolve(
        None, presets.load_config(Path(__file__).parents[1] / "configs/seed-rmsprop.toml")
    )
    assert rmsprop.optimizer == "rmsprop" and rmsprop.name == "seed"


def test_presets_command_lists_and_shows():
    runner = CliRunner()
    listing = runner.invoke(cli, ["presets"])
    assert listing.exit_code == 0
    for p in presets.all_presets():
        assert p.name in listing.output
    one = runner.invoke(cli, ["presets", "mlp", "--json"])
    assert one.exit_code == 0 and '"name": "mlp"' in one.output


@pytest.mark.parametrize("name", sorted(model.ARCHITECTURES))
def test_every_registered_architecture_maps_pixels_to_ten_logits(name):
    import numpy as np

    recipe = dataclasses.replace(presets.get("seed"), model=name)
    net = model.build(recipe.model)
    logits = net(np.zeros((2, 28, 28, 1), np.float32), training=False)
    assert tuple(logits.shape) == (2, 10) and net.name == name


@pytest.mark.parametrize("name", sorted(optimizers.OPTIMIZERS))
def test_every_registered_optimizer_takes_a_step(name):
    import keras

    variable = keras.Variable([1.0, -1.0])
    opt = optimizers.build(name, 0.1)
    opt.apply([keras.ops.convert_to_tensor([1.0, -1.0])], [variable])
    assert isinstance(opt, keras.optimizers.Optimizer)
    assert abs(float(variable.numpy()[0])) < 1.0  # moved against the gradient


def test_the_preset_names_are_the_model_sides_registries_in_order():
    """presets keeps stdlib tuples of the names (no TensorFlow at start-up); they must be the
    model side's registries, in the same order."""
    assert presets.ARCHITECTURES == tuple(model.ARCHITECTURES)
    assert presets.OPTIMIZERS == tuple(optimizers.OPTIMIZERS)


def test_an_unknown_architecture_is_a_usage_error_with_a_suggestion():
    with pytest.raises(UsageError, match="unknown model 'sed'; did you mean 'seed'"):
        dataclasses.replace(presets.get("seed"), model="sed").validate()


def test_given_keeps_what_the_config_says_unless_a_flag_overrides_it():
    config = {"preset": "mlp", "epochs": 3}
    assert presets.given(None, config, epochs=None, seed=4) == {
        "preset": "mlp",
        "epochs": 3,
        "seed": 4,
    }
    assert presets.given("seed", config, epochs=5) == {"preset": "seed", "epochs": 5}


def test_clean_epochs_are_the_last_ones_and_never_the_first():
    best = presets.get("best")
    assert best.with_overrides(clean_epochs=0).first_clean_epoch == best.epochs  # none
    assert best.with_overrides(epochs=15, clean_epochs=1).first_clean_epoch == 14
    assert best.with_overrides(epochs=2, clean_epochs=5).first_clean_epoch == 1
    assert best.with_overrides(epochs=1, clean_epochs=1).first_clean_epoch == 1  # none: 1 epoch
