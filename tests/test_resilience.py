"""Nothing lost: kill -9 and resume, Ctrl-C, crashes while writing, one writer, divergence."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import saved_weights

from cnnmnist import checkpoint, files
from cnnmnist.cli import cli
from cnnmnist.training import resume

SMALL = ["--train-size", "6000", "--validation-size", "500", "--epochs", "3", "--seed", "7"]
# best's 4 epochs of 46 steps (6,000 images, batch 128): its augmentation's and marks'
# random state, the one-cycle schedule, and the switch to its clean last 2 epochs all
# cross the kill and the resume.
RECIPES = {
    "seed": SMALL,
    "best": ["--preset", "best", *SMALL[:4], "--epochs", "4", "--seed", "7"],
}


def cnnmnist(*args, **kwargs):
    return [sys.executable, "-m", "cnnmnist", *args]


def start_training(out, mnist_dir, recipe=SMALL):
    return subprocess.Popen(
        cnnmnist("train", *recipe, "--out", str(out), "--data-dir", str(mnist_dir)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_epoch(out, epoch, proc, timeout=120):
    state = resume.partial_dir(out) / resume.STATE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.stderr.read()}")
        if state.exists() and json.loads(state.read_text())["epoch"] >= epoch:
            return
        time.sleep(0.05)
    pytest.fail("training made no progress")


@pytest.fixture(scope="module", params=RECIPES)
def uninterrupted(request, tmp_path_factory, mnist_dir):
    """The recipe's name, and its run without interruption."""
    out = tmp_path_factory.mktemp("ref") / "ckpt"
    subprocess.run(
        cnnmnist("train", *RECIPES[request.param], "--out", str(out), "--data-dir", str(mnist_dir)),
        check=True,
        capture_output=True,
        timeout=300,
    )
    return request.param, out


def test_kill_9_mid_epoch_then_resume_equals_an_uninterrupted_run(
    tmp_path, mnist_dir, uninterrupted
):
    name, reference_dir = uninterrupted
    recipe = RECIPES[name]
    epochs = int(recipe[recipe.index("--epochs") + 1])
    out = tmp_path / "ckpt"
    proc = start_training(out, mnist_dir, recipe)
    try:
        wait_for_epoch(out, 1, proc)
        time.sleep(0.4)  # into epoch 2
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not out.exists()
    state = json.loads((resume.partial_dir(out) / resume.STATE).read_text())
    assert 1 <= state["epoch"] < epochs

    # The same command plus --resume (flags equal to the recorded ones are accepted).
    again = ["train", *recipe, "--data-dir", str(mnist_dir), "--resume", "--out", str(out)]
    result = subprocess.run(
        cnnmnist(*again, "--json"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [row["epoch"] for row in report["history"]] == list(range(1, epochs + 1))
    assert not resume.partial_dir(out).exists()  # cleaned up once the checkpoint is in place
    for a, b in zip(saved_weights(out), saved_weights(reference_dir), strict=True):
        np.testing.assert_array_equal(a, b)
    reference = checkpoint.read(reference_dir).metadata
    assert checkpoint.read(out).metadata["test"] == reference["test"]


def test_sigint_stops_cleanly_with_exit_130_and_a_resumable_state(tmp_path, mnist_dir):
    out = tmp_path / "ckpt"
    proc = start_training(out, mnist_dir)
    try:
        wait_for_epoch(out, 1, proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert f"cnnmnist train --resume --out {out}" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    state = json.loads((resume.partial_dir(out) / resume.STATE).read_text())
    assert state["epoch"] >= 1 and len(state["history"]) == state["epoch"]


def interrupted_run(out):
    """A recorded interrupted run of `seed` (epoch 2 of 5) at `out`, without its model file."""
    resume.partial_dir(out).mkdir(parents=True)
    (resume.partial_dir(out) / resume.STATE).write_text(
        json.dumps(
            {
                "format_version": 1,
                "epoch": 2,
                "model": "epoch-2.keras",
                "seed_states": [],
                "history": [],
                "recipe": {"name": "seed", "description": "", "model": "seed", "epochs": 5},
                "options": {"dataset": "mnist", "data_dir": None},
            }
        )
    )


def test_a_fresh_run_does_not_discard_an_interrupted_one(tmp_path, mnist_dir):
    out = tmp_path / "ckpt"
    interrupted_run(out)
    result = CliRunner().invoke(cli, ["train", "--out", str(out), "--data-dir", str(mnist_dir)])
    assert result.exit_code == 1
    assert "interrupted run (epoch 2 of 5)" in result.output and "--resume" in result.output
    assert "--force" in result.output


def test_resume_accepts_the_recorded_flags_and_names_a_differing_one(tmp_path, mnist_dir):
    out = tmp_path / "ckpt"
    interrupted_run(out)
    same = ["train", "--preset", "seed", "--epochs", "5", "--resume", "--out", str(out)]
    result = CliRunner().invoke(cli, [*same, "--data-dir", str(mnist_dir)])
    # Accepted; it then fails only because this test's state has no model file.
    assert result.exit_code == 1 and "cannot load the saved training state" in result.output
    result = CliRunner().invoke(cli, [*same[:-4], "4", "--resume", "--out", str(out)])
    assert result.exit_code == 2
    assert "--epochs 4: the interrupted run" in result.output and "started with 5" in result.output


def test_force_over_an_interrupted_run_starts_over(tmp_path, mnist_dir):
    out = tmp_path / "ckpt"
    interrupted_run(out)
    tiny = ["--preset", "mlp", "--epochs", "1", "--train-size", "1000", "--validation-size", "0"]
    args = ["train", *tiny, "--out", str(out), "--data-dir", str(mnist_dir), "--force"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"discarded the interrupted run in {resume.partial_dir(out)} (epoch 2 of 5)" in (
        result.stderr
    )
    assert checkpoint.read(out).metadata["preset"] == "mlp"
    assert not resume.partial_dir(out).exists()


def test_resume_with_nothing_to_resume(tmp_path):
    for extra in ([], ["--epochs", "3"]):
        result = CliRunner().invoke(
            cli, ["train", *extra, "--resume", "--out", str(tmp_path / "x")]
        )
        assert result.exit_code == 1 and "no interrupted run to resume" in result.output


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_crash_at_the_rename_keeps_the_old_checkpoint(tmp_path, trained, mnist, monkeypatch, swap):
    """The new checkpoint is swapped in by one exchange of the two names where the file
    system has it, else by two renames: a failure at either leaves the old one in place."""
    out = tmp_path / "ckpt"
    from cnnmnist import export, runners

    def probabilities(ckpt):
        return runners.load(checkpoint.read(ckpt), fast=False).probabilities(
            mnist.test_images[:500]
        )

    shutil.copytree(trained.checkpoint, out)
    before = probabilities(out)
    real_rename, real_exchange = os.rename, files._exchange

    def failing_rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("disk fell off (injected)")
        return real_rename(src, dst)

    def failing_exchange(a, b):
        if swap == "two renames":
            return False  # a file system without the exchange: os.rename does it
        if ".tmp-" in str(a):
            raise OSError("disk fell off (injected)")
        return real_exchange(a, b)

    monkeypatch.setattr(files.os, "rename", failing_rename)
    monkeypatch.setattr(files, "_exchange", failing_exchange)
    with pytest.raises(OSError, match="injected"):
        export.write(trained.model, out, {"preset": "x"}, overwrite=True)
    monkeypatch.undo()
    np.testing.assert_array_equal(probabilities(out), before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]


def test_a_crash_between_the_renames_is_repaired_on_the_next_run(tmp_path, trained):
    out = tmp_path / "ckpt"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    # What kill -9 between the two renames leaves: the old checkpoint moved aside, a temporary.
    shutil.copytree(trained.checkpoint, tmp_path / f".ckpt.old-{dead}-0")
    (tmp_path / f".ckpt.tmp-{dead}-abc123").mkdir()
    files.recover(out)
    assert checkpoint.read(out).metadata == checkpoint.read(trained.checkpoint).metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_second_writer_is_refused_and_a_dead_one_leaves_no_stuck_lock(tmp_path, mnist_dir):
    out = tmp_path / "ckpt"
    with files.lock(out):
        result = CliRunner().invoke(cli, ["train", "--out", str(out), "--data-dir", str(mnist_dir)])
    assert result.exit_code == 1 and "another `cnnmnist train`" in result.output
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from cnnmnist import files; from pathlib import Path; import time\n"
            f"with files.lock(Path({str(out)!r})):\n print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    with files.lock(out):  # the kernel released the dead process's lock
        pass


def test_divergence_stops_at_once_and_keeps_the_good_checkpoint(tmp_path, trained, mnist_dir):
    out = tmp_path / "ckpt"
    shutil.copytree(trained.checkpoint, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--learning-rate",
            "1000",
            "--train-size",
            "3000",
            "--validation-size",
            "500",
            "--epochs",
            "3",
            "--out",
            str(out),
            "--force",
            "--data-dir",
            str(mnist_dir),
        ],
    )
    assert result.exit_code == 1
    assert "diverged" in result.output and "epoch 1, step" in result.output
    assert "lower --learning-rate" in result.output
    assert result.stderr.count("epoch 1/3") == 1 and "epoch 2/3" not in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
