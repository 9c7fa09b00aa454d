"""The command line: parse, call one library function, hand the result to `render`.

The only place where errors become exit codes. Nothing here imports TensorFlow at module
level: `cnnmnist --help` must stay instant.
"""

from __future__ import annotations

import collections
import io
import os
import re
import sys
from pathlib import Path

import click
from click.shell_completion import CompletionItem

from cnnmnist import __version__, files, presets, render
from cnnmnist.cluster import STRATEGIES
from cnnmnist.errors import CnnmnistError, Interrupted, UsageError, os_error, tf_failure

EXIT_INTERRUPTED = 130
# Commands whose results go to stdout: they refuse to run when it is closed (the results would
# be lost without a word).
WRITES_RESULTS = {"train", "evaluate", "inspect", "predict", "explain", "presets", "data"}


class Cli(click.Group):
    """A group that turns the project's exceptions into messages and exit codes, not tracebacks."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UsageError as e:
            raise click.UsageError(render.safe(e, newlines=True), ctx) from None
        except Interrupted as e:
            render.note(str(e))
            ctx.exit(EXIT_INTERRUPTED)
        except CnnmnistError as e:
            raise click.ClickException(render.safe(e, newlines=True)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader of stdout went away (`| head`): nothing left to tell it. Point stdout
            # at nothing so the interpreter's final flush does not complain either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(1)
        except OSError as e:  # permissions, missing parents, full disks: one line, no traceback
            raise click.ClickException(render.safe(os_error(e))) from None
        except Exception as e:  # a TensorFlow runtime error (out of memory, ...): one line
            converted = tf_failure(e, doing=ctx.invoked_subcommand or "cnnmnist")
            if converted is None:
                raise  # anything else is a bug: its traceback is what a report needs
            raise click.ClickException(render.safe(converted)) from None


def _show_version(ctx: click.Context) -> None:
    click.echo(f"cnnmnist {__version__}\n{versions_report()}")
    ctx.exit()


def versions_report() -> str:
    """What a bug report needs, from package metadata (importing nothing heavy)."""
    import platform
    from importlib import metadata

    from cnnmnist.hardware import NATIVE_BF16, cpu_flags, onednn_cap

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    lines = [f"{name} {version(name)}" for name in ("tensorflow", "keras", "ai-edge-litert")]
    lines.append(f"python {platform.python_version()} ({platform.platform()})")
    bf16 = sorted(cpu_flags() & NATIVE_BF16)
    lines.append(f"native bfloat16: {'yes (' + ', '.join(bf16) + ')' if bf16 else 'no'}")
    if cap := onednn_cap():
        lines.append(f"oneDNN held to {cap} (ONEDNN_MAX_CPU_ISA): --precision auto runs float32")
    gpus = sorted(Path("/proc/driver/nvidia/gpus").glob("*"))
    lines.append(f"NVIDIA GPUs seen by the driver: {len(gpus)}")
    return "\n".join(lines)


def _preset_names(incomplete: str) -> list[str]:
    """Shell completion of preset names."""
    return [p.name for p in presets.all_presets() if p.name.startswith(incomplete)]


def _checkpoint_name(path: Path) -> Path:
    """--out must name a directory of its own: not '', '.', '..' or '/'."""
    if path.name in ("", ".", ".."):
        raise click.BadParameter(
            f"{str(path)!r} does not name a checkpoint directory of its own; give one, "
            "e.g. --out ckpt or --out runs/seed-1",
            param_hint="--out",
        )
    return path


def _device_list(value: str | None) -> tuple[str, ...]:
    """--devices: TensorFlow device names such as /gpu:0 or /cpu:0, comma-separated."""
    from cnnmnist.cluster import parse_devices

    try:
        return parse_devices(value)
    except UsageError as e:
        raise click.BadParameter(str(e), param_hint="--devices") from None


def _picture(formats: tuple[str, ...]):
    """A callback checking an output picture's path before any work (files.output_file)."""

    def check(ctx, param, value: Path | None) -> Path | None:
        if value is None:
            return None
        try:
            files.output_file(value, formats, param.opts[0])
        except UsageError as e:
            raise click.BadParameter(str(e), param_hint=param.opts[0]) from None
        return value

    return check


PICTURES = ("png", "svg", "pdf")


def picture_option(*names: str, help: str, formats: tuple[str, ...] = PICTURES):
    """An option naming a picture to draw, its path checked before any work."""
    return click.option(
        *names,
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        callback=_picture(formats),
        help=help,
    )


dataset_option = click.option(
    "--dataset",
    type=click.Choice(presets.DATASETS),
    default=None,
    help="Dataset: mnist (default), or fashion-mnist (same format, other images).",
)
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder with the four IDX files (or mnist.npz), downloading there if missing. Default: "
    "$CNNMNIST_DATA_DIR, then Keras's mnist.npz, Debian's Fashion-MNIST, then the user cache.",
)
checkpoint_argument = click.argument(
    "ckpt",
    type=click.Path(path_type=Path),
    default=Path("ckpt"),
    required=False,
    shell_complete=lambda ctx, param, incomplete: [CompletionItem(incomplete, type="dir")],
)
model_option = click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path),
    default=Path("ckpt"),
    show_default=True,
    shell_complete=lambda ctx, param, incomplete: [CompletionItem(incomplete, type="dir")],
    help="Checkpoint directory.",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."
)


@click.group(
    cls=Cli,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Examples:\n\n\b\n  cnnmnist train --preset fast\n  cnnmnist evaluate ckpt\n"
    "  cnnmnist predict my-digit.png\n  cnnmnist serve ckpt\n\n"
    "`cnnmnist COMMAND --help` shows a command's options.",
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, param, value: _show_version(ctx) if value else None,
    help="Show the versions of cnnmnist and its libraries, and the hardware seen; exit.",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Also show TensorFlow's own start-up and runtime log lines (hidden by default).",
)
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Train, check, explain and serve a convolutional digit classifier."""
    for stream in (sys.stdout, sys.stderr):  # a file name the terminal cannot show: escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if ctx.invoked_subcommand in WRITES_RESULTS and not _is_open(sys.stdout):
        raise click.UsageError(
            "standard output is closed: the results would be lost. Run the command with "
            "stdout open (or redirected to a file)"
        )
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    elif ctx.invoked_subcommand in ("train", "evaluate", "predict", "explain", "serve", "inspect"):
        from cnnmnist.quiet import filter_native_stderr

        filter_native_stderr()


def _is_open(stream) -> bool:
    """Whether a standard stream is open (a closed descriptor leaves Python with None)."""
    if stream is None:
        return False
    try:
        os.fstat(stream.fileno())
    except io.UnsupportedOperation:  # in memory, with no descriptor (a test's): open if not closed
        return not getattr(stream, "closed", False)
    except (OSError, ValueError):
        return False
    except AttributeError:
        return True  # no fileno at all: in memory
    return True


# The help of every recipe field `train` takes as an option (names and types: presets.TUNABLE).
RECIPE_HELP = {
    "optimizer": "Optimizer.",
    "learning_rate": "Peak learning rate.",
    "epochs": "Passes over the training images.",
    "batch_size": "Images per step: the global batch, split over the replicas when training "
    "is distributed.",
    "seed": "Random seed. Same seed, same machine: same result.",
    "validation_size": "Images held out for validation from the START of the training file "
    "(the chapter's 5000), unlike Keras's validation_split, a fraction from the end; 0: none.",
    "train_size": "Train on only the first N images after the validation ones; 0: all.",
    "precision": "Compute precision (mixed policies; softmax and loss stay float32). auto: "
    "bfloat16 on CPUs with native BF16, float16 on GPUs, else float32.",
    "schedule": "Learning rate over the run: constant, or one-cycle (warm-up, then cosine to 0).",
    "label_smoothing": "Train against (1 - E) * one-hot + E / 10 (reported losses stay plain "
    "cross-entropy).",
    "flagged_ones": "Share of the training 1s redrawn with a flag from the top, as much of "
    "the world writes them.",
    "box_scans": "Share of the training digits stored as box-normalised scans (stretched to "
    "fill a small square, binarised, cut at its edge), as some scanned collections are.",
    "clean_epochs": "The last N epochs train on the digits as given, without augmentation.",
}
RECIPE_TYPES = {
    "optimizer": click.Choice(presets.OPTIMIZERS),
    "precision": click.Choice(presets.PRECISIONS),
    "schedule": click.Choice(presets.SCHEDULES),
    "epochs": click.IntRange(min=1),
    "batch_size": click.IntRange(1, presets.MAX_BATCH),
    "seed": click.IntRange(0, presets.MAX_SEED),
    "validation_size": click.IntRange(0, 59999),
    "train_size": click.IntRange(min=0),
    "learning_rate": click.FloatRange(min=0, min_open=True),
    "label_smoothing": click.FloatRange(0, 1, max_open=True),
    "flagged_ones": click.FloatRange(0, 1),
    "box_scans": click.FloatRange(0, 1),
    "clean_epochs": click.IntRange(min=0),
}


def _preset_defaults(field: str) -> str:
    """What each preset sets `field` to, shortly: '15 (fast: 2)'."""
    values = {p.name: getattr(p, field) for p in presets.all_presets()}
    common, _ = collections.Counter(values.values()).most_common(1)[0]
    others = [
        f"{name}: {value:g}" if isinstance(value, float) else f"{name}: {value}"
        for name, value in values.items()
        if value != common
    ]
    shown = f"{common:g}" if isinstance(common, float) else str(common)
    return shown + (f" ({', '.join(others)})" if others else "")


def recipe_options(command):
    """One option per tunable recipe field, each unset unless given (the preset decides)."""
    for field in reversed(presets.TUNABLE):
        command = click.option(
            f"--{field.replace('_', '-')}",
            field,
            type=RECIPE_TYPES[field],
            default=None,
            help=f"{RECIPE_HELP[field]} [preset's: {_preset_defaults(field)}]",
        )(command)
    return command


@cli.command(
    short_help="Train a preset and write a SavedModel checkpoint.",
    epilog="Examples:\n\n\b\n  cnnmnist train                       # the book's CNN, 15 epochs\n"
    "  cnnmnist train --preset fast --out fast\n"
    "  cnnmnist train --preset seed --optimizer rmsprop --epochs 5\n"
    "  cnnmnist train --resume --out fast   # continue a run that was stopped",
)
@click.option(
    "--preset",
    default=None,
    shell_complete=lambda ctx, param, incomplete: _preset_names(incomplete),
    help=f"Named recipe (see `cnnmnist presets`). Default: {presets.DEFAULT_PRESET}.",
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML run file (configs/*.toml); options given here override it.",
)
@recipe_options
@dataset_option
@data_dir_option
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("ckpt"),
    show_default=True,
    callback=lambda ctx, param, value: _checkpoint_name(value),
    help="Checkpoint directory to write.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing checkpoint at --out (only a cnnmnist checkpoint or an empty "
    "directory; anything else is refused).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the interrupted run writing --out from its last completed epoch.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "gpu"]),
    default="auto",
    show_default=True,
    help="Where to train: auto picks the GPUs when TensorFlow sees any.",
)
@click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    default="auto",
    show_default=True,
    help="tf.distribute strategy. auto: mirrored over all GPUs when there are several, "
    "else one device. multi-worker: the cluster in TF_CONFIG; every worker runs the same "
    "command and reads a disjoint shard of the data; worker 0 (or the chief) writes --out.",
)
@click.option(
    "--devices",
    default=None,
    callback=lambda ctx, param, value: _device_list(value),
    help="Comma-separated devices for one-device/mirrored, e.g. /gpu:0,/gpu:1.",
)
@click.option(
    "--tensorboard",
    type=click.Path(path_type=Path),
    default=None,
    help="Write TensorBoard logs here.",
)
@json_option
def train(
    preset, config, dataset, data_dir, out, force, resume, device, strategy, devices,
    tensorboard, as_json, **recipe,
) -> None:  # fmt: skip
    """Train a preset and write a SavedModel checkpoint to --out.

    The state of every completed epoch is kept in OUT.partial/ until the run ends, so a
    killed run continues with the same command plus --resume; Ctrl-C stops within a second
    or so, at the end of the running chunk of 50 steps (exit 130).
    """
    from cnnmnist import cluster

    config_values = presets.load_config(config) if config else None
    if resume:  # the same command plus --resume: what was given must match the record
        chosen, dataset_name = None, "mnist"
        expected = presets.given(preset, config_values, dataset=dataset, **recipe)
    else:
        chosen, options = presets.resolve(preset, config_values, dataset=dataset, **recipe)
        dataset_name, expected = options["dataset"], {}
    cluster.role(strategy)  # a bad TF_CONFIG fails here, before TensorFlow loads
    with render.status("loading TensorFlow"):
        from cnnmnist import training

    result = training.run(
        chosen,
        training.Options(
            dataset=dataset_name,
            data_dir=data_dir,
            out=out,
            force=force,
            resume=resume,
            device=device,
            strategy=strategy,
            devices=devices,
            tensorboard=tensorboard,
            expected=expected,
        ),
    )
    for warning in result.warnings:
        render.warn(warning, style="bold red")
    if as_json:
        render.print_json(result.to_json())
    else:
        click.echo(render.trained(result.to_json()))


@cli.command(
    "presets",
    short_help="List the presets, or show one in full.",
    epilog="Examples:\n\n\b\n  cnnmnist presets\n  cnnmnist presets best\n"
    "  cnnmnist presets --json",
)
@click.argument(
    "name", required=False, shell_complete=lambda ctx, param, incomplete: _preset_names(incomplete)
)
@json_option
def presets_cmd(name, as_json) -> None:
    """List the presets, or show one in full."""
    from dataclasses import asdict

    chosen = [asdict(presets.get(name))] if name else [asdict(p) for p in presets.all_presets()]
    if as_json:
        render.print_json(chosen)
    elif name:
        render.out().print(render.preset_table(chosen[0]))
    else:
        render.out().print(render.presets_table(chosen, presets.DEFAULT_PRESET))


@cli.command(
    "data",
    short_help="Show where a dataset is and whether its checksums match.",
    epilog="Examples:\n\n\b\n  cnnmnist data\n  cnnmnist data --dataset fashion-mnist\n"
    "  cnnmnist data --data-dir ~/datasets/mnist --json",
)
@dataset_option
@data_dir_option
@json_option
def data_cmd(dataset, data_dir, as_json) -> None:
    """Show where a dataset is, its sizes, and whether every checksum matches."""
    from cnnmnist import data

    name = dataset or "mnist"
    directory, checks = data.check(name, data_dir)
    files = [
        {
            "file": str(c.path),
            "name": c.path.name,
            "shape": c.shape,
            "md5": c.md5,
            "expected_md5": c.expected_md5,
            "ok": c.ok,
            "error": c.error,
        }
        for c in checks
    ]
    if as_json:
        report = {"dataset": name, "directory": str(directory), "ok": all(c.ok for c in checks)}
        render.print_json(
            report | {"files": [{k: v for k, v in f.items() if k != "name"} for f in files]}
        )
    else:
        render.out().print(render.data_table(name, str(directory), files))
    bad = [c for c in checks if not c.ok]
    if bad:
        raise CnnmnistError(f"{len(bad)} of {len(checks)} files failed verification in {directory}")


@cli.command(
    short_help="Accuracy, loss, confusion matrix and per-class report of a checkpoint.",
    epilog="Examples:\n\n\b\n  cnnmnist evaluate ckpt\n  cnnmnist evaluate ckpt --plot cm.png "
    "--errors mistakes.png\n  cnnmnist evaluate ckpt --images my-digits/   # my-digits/0/ .. 9/\n"
    "  cnnmnist evaluate ckpt --corruptions",
)
@checkpoint_argument
@click.option(
    "--split",
    type=click.Choice(["test", "validation", "train"]),
    default="test",
    show_default=True,
    help="Which images of the dataset.",
)
@dataset_option
@data_dir_option
@click.option(
    "--images",
    "images_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Evaluate on your own labelled images instead: a folder with one subfolder per digit "
    "(DIR/0/ ... DIR/9/), each image prepared exactly as `predict` prepares it.",
)
@click.option(
    "--corruptions",
    is_flag=True,
    help="Report the accuracy on the split under a fixed suite of corruptions (noise, blur, "
    "slant, scale, rotation, stroke width, low resolution, light, occlusion, edges).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=1000,
    show_default=True,
    help="Images per model call (memory grows with it).",
)
@picture_option(
    "--errors",
    "errors_png",
    formats=("png",),
    help="Also draw the most confident mistakes into this PNG.",
)
@picture_option(
    "--plot",
    help="Also draw the confusion matrix into this picture (.png, .svg or .pdf). Needs "
    "matplotlib: pip install 'cnnmnist[plot]'.",
)
@json_option
@click.pass_context
def evaluate(
    ctx, ckpt, split, dataset, data_dir, images_dir, corruptions, batch_size, errors_png, plot,
    as_json,
) -> None:  # fmt: skip
    """Accuracy (with 95% CI), loss, confusion matrix and per-class report of a checkpoint."""
    from cnnmnist import evaluate as evaluation

    _refuse_mixed(ctx, images_dir, corruptions, errors_png or plot)
    if corruptions:
        result = evaluation.robustness(
            ckpt, split=split, dataset=dataset, data_dir=data_dir, batch_size=batch_size
        )
        for warning in result["warnings"]:
            render.warn(warning)
        if as_json:
            render.print_json(result)
        else:
            render.out().print(render.robustness_table(result))
        return
    if images_dir:
        report = evaluation.evaluate_folder(ckpt, images_dir, batch_size=batch_size)
    else:
        report = evaluation.evaluate(
            ckpt, split=split, dataset=dataset, data_dir=data_dir, batch_size=batch_size
        )
    for warning in report.warnings:
        render.warn(warning)
    for bad in report.unreadable:
        render.warn(
            f"{bad['file']}: {bad['error'].removeprefix(bad['file'] + ': ')}; not evaluated"
        )
    if as_json:
        render.print_json(report.to_json())
    else:
        render.out().print(render.evaluation_report(report.to_json()))
    if errors_png:  # after the result: a side file that cannot be written loses nothing else
        shown, replaced = evaluation.write_errors(report, errors_png)
        verb = "replaced" if replaced else "wrote"
        render.note(f"{verb} {errors_png} with the {shown} most confident mistakes")
    if plot:
        from cnnmnist import plots

        plots.confusion(report.to_json(), plot)
        render.note(f"drew the confusion matrix into {plot}")


def _refuse_mixed(ctx: click.Context, images_dir, corruptions: bool, pictures: bool) -> None:
    """`evaluate`'s options that do not go together: a usage error naming them."""
    given = [
        f"--{name.replace('_', '-')}"
        for name in ("split", "dataset", "data_dir")
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    ]
    if images_dir and (given or corruptions):
        raise click.UsageError(
            f"--images evaluates your own folder; it does not go with "
            f"{', '.join(given + ['--corruptions'] * corruptions)}"
        )
    if corruptions and pictures:
        raise click.UsageError(
            "--errors and --plot draw one evaluation's results; not with --corruptions"
        )


@cli.command(
    short_help="What a checkpoint is: recipe, history, test metrics, layers, signature.",
    epilog="Examples:\n\n\b\n  cnnmnist inspect ckpt\n  cnnmnist inspect ckpt --plot curves.png "
    "--filters kernels.png\n  cnnmnist inspect ckpt --json",
)
@checkpoint_argument
@picture_option(
    "--plot",
    help="Also draw the learning curves (loss and accuracy per epoch, the test result "
    "marked) into this picture. Needs matplotlib: pip install 'cnnmnist[plot]'.",
)
@picture_option(
    "--filters",
    help="Also draw the kernels of the first convolution (and the next ones, summarised) "
    "into this picture. Needs matplotlib.",
)
@json_option
def inspect(ckpt, plot, filters, as_json) -> None:
    """Show a checkpoint: its preset and hyper-parameters, training history, test metrics and
    versions (its metadata), and its network layer by layer with parameter counts and its
    serving signature (these load TensorFlow)."""
    from cnnmnist import checkpoint, explain

    meta = checkpoint.read(ckpt).metadata
    with render.status("loading the checkpoint's network and signature"):
        network = explain.network_summary(ckpt)
    if as_json:
        render.print_json(meta | {"network": network})
    else:
        render.out().print(render.metadata_summary(str(ckpt), meta))
        render.out().print(render.network_summary(network))
    if plot:  # after the result, as evaluate --errors
        from cnnmnist import plots

        plots.curves(meta, plot, str(ckpt))
        render.note(f"drew the learning curves into {plot}")
    if filters:
        from cnnmnist import explain, plots

        with render.status("loading the checkpoint's Keras model"):
            kernels = explain.kernels(ckpt)
        plots.filters(kernels, filters, f"{ckpt}: {meta.get('preset')}")
        render.note(f"drew the kernels of {', '.join(name for name, _ in kernels)} into {filters}")


@cli.command(
    short_help="The digit in each image, with probabilities.",
    epilog="Examples:\n\n\b\n  cnnmnist predict digit.png\n  cnnmnist predict photos/ --top-k 5\n"
    "  cat digit.jpg | cnnmnist predict - --json",
)
@click.argument("inputs", nargs=-1, required=True)
@model_option
@click.option(
    "--top-k",
    type=click.IntRange(1, 10),
    default=3,
    show_default=True,
    help="How many digits to list per image, most probable first.",
)
@click.option(
    "--show",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[FILE.png]",
    help="Also draw the 28x28 picture the model saw, in the terminal; with a file name, as "
    "a PNG with each original beside it (a new file: an existing one is not replaced).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the results as JSON on stdout: a list, one object per input.",
)
def predict(inputs, model_dir, top_k, show, as_json) -> None:
    """The digit in each image (files, folders, or - for stdin), with probabilities.

    Images are made to look like MNIST first: grey, light paper inverted, cropped to the
    ink, scaled to 20 px, centred by mass in 28x28. A folder is searched with its
    subfolders; hidden files and folders are skipped.
    """
    from cnnmnist import predict as prediction

    picture = Path(show) if show else None
    if picture is not None:
        if picture.exists() or picture.is_symlink():
            raise click.BadParameter(
                f"{picture} exists; --show writes a new file (choose a name not taken)",
                param_hint="--show",
            )
        files.output_file(picture, ("png",), "--show")
    results = prediction.predict(
        list(inputs), model_dir, top_k=top_k, stdin=_stdin_if_asked(inputs), on_warning=render.warn
    )
    if as_json:
        render.print_json([{k: v for k, v in r.items() if k != "pixels"} for r in results])
    else:
        render.out().print(render.prediction_table(results, show=show == ""))
    if picture is not None:
        _draw_inputs(results, picture)
    _fail_if_any(results, "predicted")


def _fail_if_any(results: list[dict], done: str) -> None:
    """Exit 1 once every input is reported, when any of them failed."""
    failed = [r for r in results if r.get("error")]
    if failed:
        raise CnnmnistError(f"{len(failed)} of {len(results)} inputs could not be {done}")


def _draw_inputs(results: list[dict], picture: Path) -> None:
    """predict --show FILE.png: each input the model saw beside its original, captioned."""
    from cnnmnist import sheets

    shown = [r for r in results if r["pixels"] is not None]
    tiles = []
    for r in shown:
        digit = "-" if r["digit"] is None else r["digit"]
        original = None if r["file"] == "<stdin>" else r["file"]
        tiles.append(sheets.Tile(r["pixels"], f"{digit}  {Path(r['file']).name}"[:24], original))
    sheets.write(tiles, picture)
    render.note(
        f"drew the {len(shown)} inputs the model saw, beside their originals, into {picture}"
    )


def _stdin_if_asked(inputs: tuple[str, ...]) -> bytes | None:
    """The bytes of standard input when '-' is among the inputs (bounded, as a file is)."""
    from cnnmnist.preprocess import STDIN, read_bounded

    if STDIN not in inputs:
        return None
    if not _is_open(sys.stdin):
        raise CnnmnistError("-: standard input is closed; give image files instead")
    return read_bounded(getattr(sys.stdin, "buffer", sys.stdin), "<stdin>")


@cli.command(
    short_help="What each layer of the CNN does to a digit, and where its evidence lies.",
    epilog="Examples:\n\n\b\n  cnnmnist explain digit.png\n  cnnmnist explain digit.png "
    "--plot digit-explained.png\n  cnnmnist explain seven.png four.png --plot why.png   "
    "# why-seven.png, why-four.png\n  cnnmnist explain digit.png --json > explained.json",
)
@click.argument("inputs", nargs=-1, required=True)
@model_option
@picture_option(
    "--plot",
    help="Also draw each image explained into a picture: this file for one image; for "
    "several, one each, named after the image (PLOT-NAME.png). Needs matplotlib.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the explanations as JSON on stdout: per image the input the model saw, the "
    "probabilities, the evidence maps and every layer's feature maps.",
)
def explain(inputs, model_dir, plot, as_json) -> None:
    """What each layer of the CNN does to each image, and which pixels the answer rests on.

    For each image: the 28x28 input the model saw, the feature maps after each convolution
    and pooling (with its kernel size, stride and output shape), and the evidence for the
    answer and for the runner-up, measured by painting over each patch of the digit in turn.
    """
    from cnnmnist import explain as explaining

    results = explaining.explain(
        list(inputs), model_dir, stdin=_stdin_if_asked(inputs), warn=render.warn
    )
    if as_json:
        render.print_json([explaining.to_json(r) for r in results])
    else:
        for result in results:
            render.out().print(render.explanation(result))
    if plot:
        from cnnmnist import plots

        explained = [r for r in results if not r.get("error")]
        for result, path in zip(explained, explaining.picture_paths(plot, explained), strict=True):
            files.output_file(path, PICTURES, "--plot")
            plots.explanation(result, path)
            render.note(f"drew {result['file']} explained into {path}")
    _fail_if_any(results, "explained")


def _model_name(ctx, param, value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", value):
        raise click.BadParameter(
            "up to 100 letters, digits, '.', '_' and '-', starting with a letter or digit",
            param_hint="--model-name",
        )
    return value


@cli.command(
    short_help="Serve a checkpoint over HTTP (TF Serving's REST API and a page) and gRPC.",
    epilog="Examples:\n\n\b\n  cnnmnist serve ckpt                # http://127.0.0.1:8501/\n"
    "  cnnmnist serve models/             # models/1/, models/2/, ...: the highest, and "
    "new ones as they appear\n  cnnmnist serve ckpt --grpc-port 8500   # TF Serving's gRPC "
    "API too\n  cnnmnist serve ckpt --host 0.0.0.0 --port 8080   # open to the network",
)
@checkpoint_argument
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0: every interface, open to the network).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8501,
    show_default=True,
    help="REST port (8501 is TF Serving's; 0 picks a free one).",
)
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also answer TF Serving's gRPC API on this port (8500 is TF Serving's). Needs "
    "tensorflow-serving-api: pip install 'cnnmnist[grpc]'; loads TensorFlow.",
)
@click.option(
    "--model-name",
    default="cnnmnist",
    show_default=True,
    callback=_model_name,
    help="The NAME in /v1/models/NAME, as TF Serving's --model_name.",
)
@click.option(
    "--poll-seconds",
    type=click.FloatRange(0.1, 3600),
    default=2.0,
    show_default=True,
    help="With a base folder of versions: how often to look for a new one.",
)
@click.option(
    "--metrics-path",
    default="/monitoring/prometheus/metrics",
    show_default=True,
    help="Where the Prometheus metrics are, on the REST port.",
)
@click.option("--access-log", is_flag=True, help="Log every request on stderr (Uvicorn's format).")
@click.option(
    "--allow-host",
    multiple=True,
    help="Also answer requests that name this host (repeatable; '*' for any). By default "
    "the server answers to its own address and to localhost.",
)
@click.option(
    "--allow-origin",
    multiple=True,
    help="Let web pages from this origin, e.g. https://example.org, call the server "
    "(repeatable; '*' for any). By default only the server's own page may.",
)
@click.pass_context
def serve(ctx, ckpt, host, port, **options) -> None:
    """Serve a checkpoint over HTTP: TF Serving's REST API, POST /predict and /explain for
    image files, a page to draw a digit at /, and Prometheus metrics; with --grpc-port, TF
    Serving's gRPC API too. CKPT may be a base folder of numbered checkpoints (CKPT/1/,
    CKPT/2/, ...), as TF Serving serves: the highest is served, and a newer one is swapped in
    when it appears. AIP_HTTP_PORT, AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE (Vertex AI's
    custom containers) are honoured when set. Ctrl-C (or SIGTERM) stops it, exit 0.
    """
    from cnnmnist import server

    server.require(grpc=options["grpc_port"] is not None)
    from cnnmnist.server import listen

    asked = listen.platform(os.environ)
    default = click.core.ParameterSource.DEFAULT
    if "port" in asked and ctx.get_parameter_source("port") is default:
        port = asked.pop("port")
    if "host" in asked and ctx.get_parameter_source("host") is default:
        host = asked.pop("host")
    settings = listen.Options(
        name=options["model_name"],
        allow_hosts=options["allow_host"],
        allow_origins=options["allow_origin"],
        grpc_port=options["grpc_port"],
        metrics_path=options["metrics_path"],
        access_log=options["access_log"],
        poll_seconds=options["poll_seconds"],
        health_route=asked.get("health_route"),
        predict_route=asked.get("predict_route"),
    )
    with render.status("loading the model"):
        running, address = listen.open_server(ckpt, host, port, settings, render.warn)
    running.run(announce=lambda: render.err().print(render.serving(running, address, settings)))
    render.note("stopped")


def main() -> None:  # pragma: no cover - `python -m cnnmnist`
    cli(prog_name="cnnmnist")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
