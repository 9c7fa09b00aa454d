"""What every command shows: Rich consoles, tables and status lines, and the escaping of every
text this tool did not write (file names, metadata, messages), so nothing reaches the
terminal as a control sequence or as Rich markup. Rich is imported only when used."""

from __future__ import annotations

import contextlib
import json
import sys
import unicodedata
from collections.abc import Iterator
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

# Lines written to a pipe or a file are never wrapped: a reader (or `grep`) sees one line per
# row. Rich would otherwise wrap them at 80 columns.
PIPED_WIDTH = 4096


def safe(value: Any, newlines: bool = False) -> str:
    """`value` as text with every control and format character (escape sequences, bells,
    carriage returns, bidirectional overrides) written out as an escape, \\x1b and the like,
    so that it shows, and does nothing. `newlines`: keep line breaks (messages)."""
    text = str(value)

    def shown(char: str) -> str:
        if newlines and char == "\n":
            return char
        if unicodedata.category(char) in ("Cc", "Cf") or char in "\u2028\u2029":
            return char.encode("unicode_escape").decode("ascii")
        return char

    return "".join(map(shown, text)) if not text.isprintable() else text


def text(value: Any, style: str = "") -> Text:
    """A Rich Text of `value`, escaped (`safe`) and never read as markup."""
    from rich.text import Text

    return Text(safe(value), style=style)


def _console(stderr: bool) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    terminal = bool(getattr(stream, "isatty", lambda: False)())
    return Console(stderr=stderr, width=None if terminal else PIPED_WIDTH, highlight=False)


@cache
def err() -> Console:
    """Progress and status: stderr."""
    return _console(stderr=True)


@cache
def out() -> Console:
    """Results: stdout."""
    return _console(stderr=False)


def warn(message: str, style: str = "bold yellow") -> None:
    """A warning on stderr."""
    from rich.text import Text

    err().print(Text.assemble(("warning: ", style), safe(message, newlines=True)), soft_wrap=True)


def note(message: str) -> None:
    """A line of status on stderr (what was written where)."""
    err().print(text(message), soft_wrap=True)


def print_json(value: Any) -> None:
    """A result as JSON on stdout (strings escaped by JSON itself)."""
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """While the block runs, say what is happening: a spinner on a terminal (gone when the
    block ends), one line otherwise (a log shows where a run spent its time)."""
    console = err()
    if not console.is_terminal:
        console.print(text(message + " ..."), soft_wrap=True)
        yield
        return
    with console.status(text(message + " ..."), spinner="dots"):
        yield


# --- tables -------------------------------------------------------------------------------


def _table(title: str, columns: tuple[str, ...] = (), **options):
    from rich.table import Table

    table = Table(title=text(title), **options)
    for column in columns:
        table.add_column(column)
    return table


def presets_table(presets: list[dict[str, Any]], default: str):
    """`cnnmnist presets`: a row per preset."""
    table = _table(
        "presets", ("name", "what it is", "optimizer", "epochs", "batch", "book's accuracy")
    )
    table.columns[1].overflow = "fold"
    for p in presets:
        reference = f"{p['reference_accuracy']:.2%}" if p["reference_accuracy"] else "-"
        name = p["name"] + (" (default)" if p["name"] == default else "")
        optimizer = f"{p['optimizer']} {p['learning_rate']:g}"
        table.add_row(
            name, p["description"], optimizer, str(p["epochs"]), str(p["batch_size"]), reference
        )
    return table


def preset_table(preset: dict[str, Any]):
    """`cnnmnist presets NAME`: every field that is set."""
    table = _table(f"preset {preset['name']}", show_header=False)
    for key, value in preset.items():
        if value not in (None, ""):
            table.add_row(key, text(value))
    return table


def data_table(dataset: str, directory: str, checks: list[dict[str, Any]]):
    """`cnnmnist data`: each file, its shape, checksum and verdict."""
    table = _table(f"{dataset} in {directory}", ("file", "shape", "md5 (decompressed)", "checksum"))
    for c in checks:
        verdict = text("ok", "green") if c["ok"] else text(c["error"], "red")
        shape = "x".join(map(str, c["shape"])) if c["shape"] else "-"
        table.add_row(text(c["name"]), shape, c["md5"] or "-", verdict)
    return table


def trained(result: dict[str, Any]) -> str:
    """The line `train` ends with."""
    written = result["checkpoint"] or (
        f"worker {result['worker']['index']} of {result['worker']['of']}: the chief writes it"
    )
    epochs = result["epochs"]
    return safe(
        f"test accuracy {result['test_accuracy']:.4f}  loss {result['test_loss']:.4f}  "
        f"({epochs} epoch{'s' if epochs != 1 else ''}, {result['seconds']:.1f} s) -> {written}"
    )


def evaluation_report(report: dict[str, Any]):
    """Rich renderables for an evaluation report (the dict from evaluate.Report.to_json)."""
    from rich.console import Group
    from rich.text import Text

    low, high = report["accuracy_ci95"]
    headline = Text.assemble(
        ("accuracy ", "bold"),
        (f"{report['accuracy']:.2%}", "bold green"),
        f"  (95% CI {low:.2%} - {high:.2%}, Wilson)   loss {report['loss']:.4f}   "
        f"n {report['n']}   ",
        safe(f"{report['dataset']} / {report['split']}"),
    )
    matrix = report["confusion_matrix"]
    worst = {(p["true"], p["predicted"]) for p in report["most_confused"]}
    cm = _table("confusion matrix (rows: true, columns: predicted)")
    cm.add_column("true", justify="right", style="bold")
    for k in range(len(matrix)):
        cm.add_column(str(k), justify="right")
    for t, row in enumerate(matrix):
        cells = []
        for p, count in enumerate(row):
            if t == p:
                cells.append(f"[green]{count}[/]")
            elif (t, p) in worst:
                cells.append(f"[bold red]{count}[/]")
            elif count:
                cells.append(f"[yellow]{count}[/]")
            else:
                cells.append("[dim]0[/]")
        cm.add_row(str(t), *cells)
    pc = _table("per class")
    for column in ("label", "precision", "recall", "f1", "support"):
        pc.add_column(column, justify="right")
    for row in report["per_class"]:
        pc.add_row(
            str(row["label"]),
            f"{row['precision']:.4f}",
            f"{row['recall']:.4f}",
            f"{row['f1']:.4f}",
            str(row["support"]),
        )
    pairs = _table("most confused (true -> predicted)")
    for column in ("true", "predicted", "count"):
        pairs.add_column(column, justify="right")
    for p in report["most_confused"]:
        pairs.add_row(str(p["true"]), str(p["predicted"]), str(p["count"]))
    return Group(headline, cm, pc, pairs)


def robustness_table(report: dict[str, Any]):
    """The --corruptions report: one row per corruption, the clean accuracy and the mean."""
    clean = report["clean_accuracy"]
    table = _table(
        f"accuracy under corruption: {report['dataset']} / {report['split']}, "
        f"n {report['n']}, seed {report['seed']}",
        caption=f"mean {report['mean_accuracy']:.2%} (clean {clean:.2%}); the error is "
        f"{report['mean_error_ratio']:.1f}x the clean error on average. Prepared: the same "
        f"pictures through predict's preprocessing, mean {report['mean_accuracy_prepared']:.2%}",
    )
    for column in ("corruption", "accuracy", "vs clean", "worst class (recall)", "prepared"):
        table.add_column(column, justify="left" if column[0] in "cw" else "right")
    table.add_row(
        "(clean)",
        f"{clean:.2%}",
        "",
        _worst(report["clean_worst_class"]),
        f"{report['clean_accuracy_prepared']:.2%}",
    )
    for row in report["corruptions"]:
        drop = row["accuracy"] - clean
        style = "red" if drop < -0.1 else "yellow" if drop < -0.02 else "green"
        table.add_row(
            row["name"],
            f"[{style}]{row['accuracy']:.2%}[/]",
            f"{drop:+.2%}",
            _worst(row["worst_class"]),
            f"{row['accuracy_prepared']:.2%}",
        )
    return table


def _worst(worst: dict[str, Any]) -> str:
    return f"{worst['label']} ({worst['recall']:.0%})"


def metadata_summary(path: str, meta: dict[str, Any]):
    """Rich renderables summarising a checkpoint's metadata (every value escaped: a
    checkpoint's metadata is a file anyone may have edited)."""
    from rich.console import Group

    info = _table(f"checkpoint {path}", show_header=False)
    info.add_row("preset", text(meta.get("preset")))
    for key, value in (meta.get("hyperparameters") or {}).items():
        if key == "train_size" and value == 0:
            value = "0 (all)"
        info.add_row(text(key), text(value))
    dataset = meta.get("dataset") or {}
    info.add_row(
        "dataset",
        text(
            f"{dataset.get('name')} ({dataset.get('train_size')} train, "
            f"{dataset.get('validation_size')} validation)"
        ),
    )
    test = meta.get("test") or {}
    if test:
        info.add_row("test accuracy", f"{test.get('accuracy', 0):.4f} (n={test.get('n')})")
        info.add_row("test loss", f"{test.get('loss', 0):.4f}")
    if meta.get("reference_accuracy"):
        info.add_row("book's accuracy", f"{meta['reference_accuracy']:.4f}")
    versions = meta.get("versions") or {}
    info.add_row("versions", text(", ".join(f"{k} {v}" for k, v in versions.items())))
    info.add_row("created", text(meta.get("created")))
    info.add_row("format version", text(meta.get("format_version")))
    history = _table("history")
    columns = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"]
    rows = meta.get("history") or []
    columns = [c for c in columns if any(c in r for r in rows)]
    for column in columns:
        history.add_column(column, justify="right")
    for r in rows:
        history.add_row(*(_number(r.get(c), c) for c in columns))
    return Group(info, history)


def network_summary(network: dict[str, Any]):
    """The network layer by layer (as model.summary() shows it) and its serving signature."""
    from rich.console import Group

    layers = _table(
        f"network: {network['parameters']:,} parameters ({network['trainable_parameters']:,} "
        "trainable)",
        ("layer", "kind", "output shape", "parameters"),
    )
    for layer in network["layers"]:
        shape = "x".join("N" if d is None else str(d) for d in layer["output"])
        layers.add_row(text(layer["name"]), text(layer["kind"]), shape, f"{layer['parameters']:,}")
    signature = network["signature"]
    served = _table(f"serving signature {signature['name']!r}", ("", "name", "dtype", "shape"))
    for side in ("inputs", "outputs"):
        for name, tensor in signature[side].items():
            shape = "[" + ", ".join(str(d) for d in tensor["shape"]) + "]"
            served.add_row(side[:-1], text(name), tensor["dtype"], shape)
    return Group(layers, served)


def _number(value: Any, column: str = "") -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if column == "seconds" else f"{value:.4f}"
    return "-" if value is None else safe(value)


RAMP = " .:-=+*#%@"


def ascii_digit(pixels) -> str:
    """The 28x28 picture the model saw, as text in a frame (two characters per pixel,
    darkest = no ink), so its edges show."""
    rows = [
        "".join(RAMP[min(len(RAMP) - 1, int(v) * len(RAMP) // 256)] * 2 for v in row)
        for row in pixels
    ]
    edge = "+" + "-" * (2 * len(pixels[0])) + "+"
    return "\n".join([edge, *(f"|{row}|" for row in rows), edge])


def prediction_table(results: list[dict[str, Any]], show: bool = False):
    """Rich renderables for `predict` results (file, digit, confidence, next candidates, notes)."""
    from rich.console import Group
    from rich.text import Text

    table = _table(f"predictions ({results[0]['engine'] if results else '-'})")
    for column, justify in (
        ("file", "left"),
        ("digit", "right"),
        ("confidence", "right"),
        ("next candidates", "left"),
        ("notes", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    pictures = []
    for r in results:
        if r["error"]:
            table.add_row(text(r["file"]), "-", "-", "", text(f"error: {r['error']}", "red"))
            continue
        digit = "-" if r["digit"] is None else str(r["digit"])
        confidence = "-" if r["confidence"] is None else f"{r['confidence']:.1%}"
        others = ", ".join(f"{t['digit']} {t['probability']:.1%}" for t in r["top"][1:])
        table.add_row(
            text(r["file"]), digit, confidence, others, text("; ".join(r["warnings"]), "yellow")
        )
        if show and r.get("pixels") is not None:
            pictures.append(
                Text.assemble((safe(r["file"]), "bold"), ": the 28x28 input the model saw\n")
            )
            pictures.append(Text(ascii_digit(r["pixels"]) + "\n"))
    return Group(table, *pictures)


def serving(server, address, options) -> Text:
    """`serve`'s banner: where the page, the APIs and the metrics are, a line each."""
    from rich.text import Text

    url, model = address.url(server.port), server.servables.current
    name = options.name
    versions = "" if server.servables.single else f" version {model.version} of"
    lines = [
        Text.assemble(
            f"serving{versions} ",
            safe(server.servables.path),
            f" ({model.runner.name}) at ",
            (f"{url}/", "bold"),
        ),
        Text(f"  the page     {url}/"),
        Text(f"  REST API     {url}/v1/models/{name}  (TF Serving's)"),
    ]
    if server.grpc_port is not None:
        host = url.rsplit(":", 1)[0].removeprefix("http://")
        lines.append(Text(f"  gRPC API     {host}:{server.grpc_port}  (TF Serving's)"))
    lines.append(Text(f"  metrics      {url}{safe(options.metrics_path)}"))
    for label, route in (("health", options.health_route), ("predict", options.predict_route)):
        if route:
            lines.append(Text(f"  {label:<12} {url}{safe(route)}  (AIP_{label.upper()}_ROUTE)"))
    if address.everywhere:
        lines.append(
            Text(
                "  listening on every network interface: other machines can reach this "
                "server, and it asks no one for a password",
                style="bold yellow",
            )
        )
    lines.append(Text("Ctrl-C stops it"))
    return Text("\n").join(lines)


EVIDENCE = " .:+#"  # no evidence .. the strongest, for the class


def explanation(result: dict[str, Any]):
    """`explain`'s summary of one image: the answer, each block with its kernel, stride and
    output, and three 28x28 pictures side by side: the input the model saw, and where the
    evidence for the answer and for the runner-up lies."""
    from rich.console import Group
    from rich.text import Text

    name = text(result["file"], "bold")
    if result.get("error"):
        return Group(Text.assemble(name, ": ", (safe(result["error"]), "red")))
    p = result["probabilities"]
    head = Text.assemble(
        name,
        f": {result['digit']} ({p[result['digit']]:.1%}), then {result['runner_up']} "
        f"({p[result['runner_up']]:.1%})   [{result['preset']}, {result['engine']}]",
    )
    parts: list[Any] = [head]
    for warning in result["warnings"]:
        parts.append(text(f"  note: {warning}", "yellow"))
    if result["layers"]:
        table = _table("", ("layer", "what it does", "output", "maps that fire"))
        for layer in result["layers"]:
            maps = layer["maps"]
            firing = int((maps.reshape(-1, maps.shape[-1]).max(axis=0) > 0).sum())
            h, w, c = layer["shape"]
            table.add_row(layer["name"], layer["what"], f"{h}x{w}x{c}", f"{firing} of {c}")
        parts.append(table)
    else:
        parts.append(Text("  a dense network: no convolutions, so no feature maps to show"))
    parts.append(Text(_side_by_side(result)))
    return Group(*parts)


def _side_by_side(result: dict[str, Any]) -> str:
    """The input and the two evidence maps, a character a pixel, framed, with captions."""
    import numpy as np

    pictures = [
        RAMP[min(len(RAMP) - 1, int(v) * len(RAMP) // 256)] for v in np.ravel(result["input"])
    ]
    grids = [np.array(pictures).reshape(28, 28)]
    for key in ("saliency", "saliency_runner_up"):
        evidence = np.clip(np.asarray(result[key]), 0, None)
        top = max(float(evidence.max()), 1e-9)
        levels = np.minimum((evidence / top * len(EVIDENCE)).astype(int), len(EVIDENCE) - 1)
        grids.append(np.array(list(EVIDENCE))[levels])
    captions = [
        "what the model saw",
        f"evidence for {result['digit']}",
        f"evidence for {result['runner_up']}",
    ]
    lines = ["  ".join(f"{c:<30}" for c in captions)]
    edge = "+" + "-" * 28 + "+"
    lines.append("  ".join([edge] * 3))
    for row in range(28):
        lines.append("  ".join("|" + "".join(g[row]) + "|" for g in grids))
    lines.append("  ".join([edge] * 3))
    return "\n".join(lines)
