"""The command line: parse, call one library function, render.

The only place where errors become exit codes.

Nothing here imports TensorFlow at module level: `cnnmnist --help` must stay instant.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import click
from click.shell_completion import CompletionItem

from cnnmnist import __version__
from cnnmnist.distribute import STRATEGIES
from cnnmnist.errors import CnnmnistError, Interrupted, UsageError
from cnnmnist.model import OPTIMIZERS
from cnnmnist.presets import DATASETS, MAX_SEED, PRECISIONS

EXIT_INTERRUPTED = 130


class Cli(click.Group):
    """A group that turns the project's exceptions into messages and exit codes, not tracebacks."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UsageError as e:
            raise click.UsageError(str(e), ctx) from None
        except Interrupted as e:
            click.echo(str(e), err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except CnnmnistError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader of stdout went away (`| head`): nothing left to tell it. Point stdout
            # at nothing so the interpreter's final flush does not complain either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(1)
        except OSError as e:  # permissions, missing parents, full disks: one line, no traceback
            raise click.ClickException(os_error(e)) from None
        except Exception as e:  # a TensorFlow runtime error (out of memory, ...): one line
            from cnnmnist.distribute import failure

            converted = failure(e, doing=ctx.invoked_subcommand or "cnnmnist")
            if converted is None:
                raise  # anything else is a bug: its traceback is what a report needs
            raise click.ClickException(str(converted)) from None


def os_error(e: OSError) -> str:
    """'PATH: what happened' for an OS-level failure."""
    what = e.strerror or str(e)
    return f"{e.filename}: {what}" if e.filename is not None else what


def _show_version(ctx: click.Context) -> None:
    click.echo(f"cnnmnist {__version__}\n{versions_report()}")
    ctx.exit()


def versions_report() -> str:
    """What a bug report needs, from package metadata (importing nothing heavy)."""
    import platform
    from importlib import metadata

    from cnnmnist.runtime import NATIVE_BF16, cpu_flags, onednn_cap

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
    from cnnmnist import presets

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
    from cnnmnist.distribute import parse_devices

    try:
        return parse_devices(value)
    except UsageError as e:
        raise click.BadParameter(str(e), param_hint="--devices") from None


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


dataset_option = click.option(
    "--dataset", type=click.Choice(DATASETS), default=None, help="Dataset (default: mnist)."
)
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory with the four IDX files (or mnist.npz). Default: $CNNMNIST_DATA_DIR, then the "
    "user cache, downloading there if missing.",
)
checkpoint_argument = click.argument(
    "ckpt",
    type=click.Path(path_type=Path),
    default=Path("ckpt"),
    required=False,
    shell_complete=lambda ctx, param, incomplete: [CompletionItem(incomplete, type="dir")],
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object on stdout."
)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
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
    """Train, check and use a convolutional digit classifier."""
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    elif ctx.invoked_subcommand in ("train", "evaluate", "predict", "serve"):  # TF or LiteRT
        from cnnmnist.quiet import filter_native_stderr

        filter_native_stderr()


@cli.command()
@click.option(
    "--preset",
    default=None,
    shell_complete=lambda ctx, param, incomplete: _preset_names(incomplete),
    help="Named recipe (see `cnnmnist presets`). Default: seed.",
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML run file (configs/*.toml); flags given here override it.",
)
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default=None)
@click.option("--learning-rate", type=float, default=None)
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Global batch: split over the replicas when training is distributed.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, MAX_SEED),
    default=None,
    help="Same seed, same machine: same result.",
)
@click.option(
    "--validation-size",
    type=click.IntRange(min=0),
    default=None,
    help="A count of images held out for validation from the START of the training file "
    "(the chapter's 5000), unlike Keras's validation_split, a fraction from the end. "
    "0: none.",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Compute precision (mixed policies; softmax and loss stay float32). auto: bfloat16 "
    "on CPUs with native BF16, float16 on GPUs, else float32. Chapter presets: float32.",
)
@click.option(
    "--train-size",
    type=click.IntRange(min=0),
    default=None,
    help="Train on only the first N images after the validation ones (default 0: all).",
)
@click.option(
    "--label-smoothing",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="Train against (1 - E) * one-hot + E / 10 instead of the one-hot label "
    "(best: 0.1, others 0). Reported losses stay plain cross-entropy.",
)
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
    "--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True
)
@click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    default="auto",
    show_default=True,
    help="tf.distribute strategy. auto: mirrored over all GPUs when there are several, "
    "else one device. multi-worker: the cluster in TF_CONFIG; every worker runs the same "
    "command and reads a disjoint shard of the data; worker 0 (or the chief) writes --out, "
    "the others write nothing you see. --batch-size is the global batch, split over all "
    "replicas.",
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
    preset,
    config,
    optimizer,
    learning_rate,
    epochs,
    batch_size,
    seed,
    validation_size,
    precision,
    train_size,
    label_smoothing,
    dataset,
    data_dir,
    out,
    force,
    resume,
    device,
    strategy,
    devices,
    tensorboard,
    as_json,
) -> None:
    """Train a preset and write a SavedModel checkpoint to --out.

    The state of every completed epoch is kept in OUT.partial/ until the run ends, so a
    killed run continues with the same command plus --resume; Ctrl-C stops within a second
    or so, at the end of the running chunk of 50 steps (exit 130).
    """
    from cnnmnist import presets

    overrides = {
        "optimizer": optimizer,
        "learning_rate": learning_rate,
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "validation_size": validation_size,
        "train_size": train_size,
        "precision": precision,
        "label_smoothing": label_smoothing,
    }
    config_values = presets.load_config(config) if config else None
    if resume:  # the same command plus --resume: what was given must match the record
        recipe, options = None, {"dataset": "mnist"}
        expected = presets.given(preset, config_values, dataset=dataset, **overrides)
    else:
        recipe, options = presets.resolve(preset, config_values, dataset=dataset, **overrides)
        expected = {}
    from cnnmnist import train as training
    from cnnmnist.console import warn

    result = training.run(
        recipe,
        training.Options(
            dataset=options["dataset"],
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
        warn(warning, style="bold red")
    if as_json:
        _print_json(result.to_json())
    else:
        written = (
            result.checkpoint
            or f"worker {result.worker.index} of {result.worker.workers}: the chief writes it"
        )
        click.echo(
            f"test accuracy {result.test_accuracy:.4f}  loss {result.test_loss:.4f}  "
            f"({result.epochs} epochs, {result.seconds:.1f} s) -> {written}"
        )


@cli.command("presets")
@click.argument(
    "name", required=False, shell_complete=lambda ctx, param, incomplete: _preset_names(incomplete)
)
@json_option
def presets_cmd(name, as_json) -> None:
    """List the presets, or show one in full."""
    from dataclasses import asdict

    from cnnmnist import presets
    from cnnmnist.console import out

    chosen = [presets.get(name)] if name else presets.all_presets()
    if as_json:
        _print_json([asdict(p) for p in chosen])
        return
    if name:
        from rich.table import Table

        table = Table(title=f"preset {name}", show_header=False)
        for key, value in asdict(chosen[0]).items():
            table.add_row(key, str(value))
        out().print(table)
        return
    from rich.table import Table

    table = Table(title="presets")
    for column in ("name", "description", "parameters", "epochs", "reference"):
        table.add_column(column)
    for p in chosen:
        params = f"{p.optimizer} lr={p.learning_rate:g} batch={p.batch_size}"
        ref = f"{p.reference_accuracy:.2%}" if p.reference_accuracy else "-"
        default = " (default)" if p.name == presets.DEFAULT_PRESET else ""
        table.add_row(p.name + default, p.description, params, str(p.epochs), ref)
    out().print(table)


@cli.command("data")
@dataset_option
@data_dir_option
@json_option
def data_cmd(dataset, data_dir, as_json) -> None:
    """Show where a dataset is, its sizes, and whether every checksum matches."""
    from cnnmnist import data
    from cnnmnist.console import out

    directory, checks = data.check(dataset or "mnist", data_dir)
    bad = [c for c in checks if not c.ok]
    if as_json:
        _print_json(
            {
                "dataset": dataset or "mnist",
                "directory": str(directory),
                "ok": not bad,
                "files": [
                    {
                        "file": str(c.path),
                        "shape": c.shape,
                        "md5": c.md5,
                        "expected_md5": c.expected_md5,
                        "ok": c.ok,
                        "error": c.error,
                    }
                    for c in checks
                ],
            }
        )
    else:
        from rich.table import Table

        table = Table(title=f"{dataset or 'mnist'} in {directory}")
        for column in ("file", "shape", "md5 (decompressed)", "checksum"):
            table.add_column(column)
        for c in checks:
            verdict = "[green]ok[/]" if c.ok else f"[red]{c.error}[/]"
            shape = "x".join(map(str, c.shape)) if c.shape else "-"
            table.add_row(c.path.name, shape, c.md5 or "-", verdict)
        out().print(table)
    if bad:
        raise CnnmnistError(f"{len(bad)} of {len(checks)} files failed verification in {directory}")


@cli.command()
@checkpoint_argument
@click.option(
    "--split", type=click.Choice(["test", "validation", "train"]), default="test", show_default=True
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
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--errors",
    "errors_png",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a PNG of the most confident mistakes here.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw the confusion matrix into this PNG. Needs matplotlib: "
    "pip install 'cnnmnist[plot]'.",
)
@json_option
@click.pass_context
def evaluate(
    ctx,
    ckpt,
    split,
    dataset,
    data_dir,
    images_dir,
    corruptions,
    batch_size,
    errors_png,
    plot,
    as_json,
) -> None:
    """Accuracy (with 95% CI), loss, confusion matrix and per-class report of a checkpoint."""
    from cnnmnist import evaluate as evaluation
    from cnnmnist.console import err, evaluation_report, out, robustness_table, warn

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
    if corruptions and (errors_png or plot):
        raise click.UsageError(
            "--errors and --plot draw one evaluation's results; not with --corruptions"
        )
    if corruptions:
        result = evaluation.robustness(
            ckpt, split=split, dataset=dataset, data_dir=data_dir, batch_size=batch_size
        )
        for warning in result["warnings"]:
            warn(warning)
        if as_json:
            _print_json(result)
        else:
            out().print(robustness_table(result))
        return
    if images_dir:
        report = evaluation.evaluate_folder(ckpt, images_dir, batch_size=batch_size)
    else:
        report = evaluation.evaluate(
            ckpt, split=split, dataset=dataset, data_dir=data_dir, batch_size=batch_size
        )
    for warning in report.warnings:
        warn(warning)
    for bad in report.unreadable:
        warn(f"{bad['file']}: {bad['error'].removeprefix(bad['file'] + ': ')}; not evaluated")
    if as_json:
        _print_json(report.to_json())
    else:
        out().print(evaluation_report(report.to_json()))
    if errors_png:  # after the result: a side file that cannot be written loses nothing else
        shown, replaced = evaluation.write_errors(report, errors_png)
        verb = "replaced" if replaced else "wrote"
        err().print(f"{verb} {errors_png} with the {shown} most confident mistakes")
    if plot:
        from cnnmnist import plots

        plots.confusion(report.to_json(), plot)
        err().print(f"drew the confusion matrix into {plot}")


@cli.command()
@checkpoint_argument
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw the learning curves (loss and accuracy per epoch, the test result "
    "marked) into this PNG. Needs matplotlib: pip install 'cnnmnist[plot]'.",
)
@json_option
def inspect(ckpt, plot, as_json) -> None:
    """Show a checkpoint's metadata: preset, hyper-parameters, history, test metrics, versions."""
    from cnnmnist import checkpoint
    from cnnmnist.console import err, metadata_summary, out

    meta = checkpoint.read(ckpt).metadata
    if as_json:
        _print_json(meta)
    else:
        out().print(metadata_summary(str(ckpt), meta))
    if plot:  # after the result, as evaluate --errors
        from cnnmnist import plots

        plots.curves(meta, plot, str(ckpt))
        err().print(f"drew the learning curves into {plot}")


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path),
    default=Path("ckpt"),
    show_default=True,
    shell_complete=lambda ctx, param, incomplete: [CompletionItem(incomplete, type="dir")],
    help="Checkpoint directory.",
)
@click.option("--top-k", type=click.IntRange(1, 10), default=3, show_default=True)
@click.option("--show", is_flag=True, help="Also draw the 28x28 picture the model saw.")
@json_option
def predict(inputs, model_dir, top_k, show, as_json) -> None:
    """The digit in each image (files, directories, or - for stdin), with probabilities.

    Images are made to look like MNIST first: grey, light paper inverted, cropped to the
    ink, scaled to 20 px, centred by mass in 28x28.
    """
    from cnnmnist import predict as prediction
    from cnnmnist.console import out, prediction_table, warn

    stdin = (
        prediction.read_bounded(sys.stdin.buffer, "<stdin>") if prediction.STDIN in inputs else None
    )
    results = prediction.predict(
        list(inputs),
        model_dir,
        top_k=top_k,
        stdin=stdin,
        on_warning=warn,
    )
    if as_json:
        _print_json([{k: v for k, v in r.items() if k != "pixels"} for r in results])
    else:
        out().print(prediction_table(results, show=show))
    failed = [r for r in results if r["error"]]
    if failed:
        raise CnnmnistError(f"{len(failed)} of {len(results)} inputs could not be predicted")


@cli.command()
@checkpoint_argument
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8501,
    show_default=True,
    help="Port (8501 is TF Serving's REST port; 0 picks a free one).",
)
@click.option(
    "--model-name",
    default="cnnmnist",
    show_default=True,
    help="The NAME in /v1/models/NAME, as TF Serving's --model_name.",
)
def serve(ckpt, host, port, model_name) -> None:
    """Serve a checkpoint over HTTP: TF Serving's REST API, POST /predict for image files, and
    a page to draw a digit at /. Ctrl-C (or SIGTERM) stops it, exit 0.
    """
    from cnnmnist import serve as serving
    from cnnmnist.console import err, warn

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", model_name):
        raise click.BadParameter(
            "letters, digits, '.', '_' and '-' only", param_hint="--model-name"
        )
    model = serving.Model(ckpt, model_name, warn)
    server = serving.Server(model, host, port)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{server.port}"
    server.run(
        announce=lambda: err().print(
            f"serving {ckpt} ({model.engine.name}) as {model_name!r}: the page at {url}/, the "
            f"API at {url}/v1/models/{model_name}; Ctrl-C stops it",
            highlight=False,
        )
    )
    err().print("stopped")


def main() -> None:  # pragma: no cover - `python -m cnnmnist`
    cli(prog_name="cnnmnist")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
