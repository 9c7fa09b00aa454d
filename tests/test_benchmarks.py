"""The benchmark scripts run end to end in tiny mode."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_tiny(script, out, mnist_dir, *flags):
    """Run a benchmark script in its tiny mode; its results file, parsed."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--out", str(out)]
    command += flags
    proc = subprocess.run(
        [*command, "--data-dir", str(mnist_dir)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_reproduce_tiny_writes_a_well_formed_results_file(tmp_path, mnist_dir):
    # Two rows, one at a time (every row is the same path; every config is loaded in
    # test_presets and every preset trained in test_every_preset): the second run keeps
    # the first one's row.
    out = tmp_path / "reproduce.json"
    run_tiny("reproduce.py", out, mnist_dir, "--only", "seed-adam", "--keep", str(tmp_path))
    assert (tmp_path / "seed-adam-seed1" / "cnnmnist.json").exists()  # --keep: its checkpoint
    results = run_tiny("reproduce.py", out, mnist_dir, "--only", "best")
    names = [row["name"] for row in results["rows"]]
    assert {"seed-adam", "seed-rmsprop", "seed-layers", "mlp", "best"} <= set(names)
    for row in results["rows"]:
        assert set(row) >= {"name", "config", "reference", "runs"}
        assert (ROOT / row["config"]).exists()
        assert len(row["runs"]) == (row["name"] in ("seed-adam", "best"))
    for row in (row for row in results["rows"] if row["runs"]):
        run = row["runs"][0]
        assert set(run) >= {"seed", "test_accuracy", "minutes"}
        assert 0.0 <= run["test_accuracy"] <= 1.0 and run["minutes"] > 0
        assert run["peak_rss_mb"] > 100  # TensorFlow alone is several hundred MB
    table = out.with_suffix(".md").read_text()
    assert "| seed-adam |" in table and "| best |" in table


def test_throughput_tiny_writes_a_well_formed_results_file(tmp_path, mnist_dir):
    out = tmp_path / "throughput.json"
    results = run_tiny("throughput.py", out, mnist_dir)
    contenders = {"plain_keras_float32", "cnnmnist_float32", "cnnmnist_bfloat16"}
    assert set(results["images_per_second"]) == contenders
    assert all(v > 0 for v in results["images_per_second"].values())
    assert results["ratio_vs_plain_keras"]["plain_keras_float32"] == 1.0


def test_wallclock_tiny_writes_a_well_formed_results_file(tmp_path, mnist_dir):
    results = run_tiny("wallclock.py", tmp_path / "wallclock.json", mnist_dir)
    (path,) = results["fast_by_precision_path"]
    record = results["fast_by_precision_path"][path]
    (fast,) = record["runs"]
    (keras,) = record["plain_keras_one_epoch"]
    assert fast["args"][:2] == ["--preset", "fast"]
    assert 0.0 <= fast["test_accuracy"] <= 1.0 and fast["seconds"] > 0
    assert 0.0 <= keras["test_accuracy"] <= 1.0 and keras["seconds"] > 0
    assert record["ratio_to_plain_keras_one_epoch"] == round(fast["seconds"] / keras["seconds"], 3)
    assert results["seed_run"]["peak_rss_mb"] > 100  # TensorFlow alone is several hundred MB
    assert len(results["help_seconds"]["runs"]) == 5
    ratio = record["target"]["ratio"]
    assert record["within_target"] == (
        fast["test_accuracy"] >= 0.99
        and fast["seconds"] <= 30
        and record["ratio_to_plain_keras_one_epoch"] <= ratio
    )
    assert record["ratio_within_target"] == (
        fast["test_accuracy"] >= 0.99 and record["ratio_to_plain_keras_one_epoch"] <= ratio
    )
    predict = results["predict_one_image"]
    assert len(predict["runs"]) == 2 and predict["median"] > 0
    assert predict["python_importing_numpy"]["median"] > 0
    assert len(predict["python_importing_the_libraries"]["runs"]) == 2


def test_wallclock_predict_only_updates_that_entry_alone(tmp_path, trained, mnist_dir):
    out = tmp_path / "wallclock.json"
    out.write_text(json.dumps({"help_seconds": {"median": 0.1}}))
    command = [sys.executable, str(ROOT / "benchmarks" / "wallclock.py"), "--out", str(out)]
    command += ["--predict-only", str(trained.checkpoint), "--data-dir", str(mnist_dir)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["help_seconds"] == {"median": 0.1}  # the rest of the record is kept
    predict = results["predict_one_image"]
    assert len(predict["runs"]) == 9 and predict["median"] > 0
    assert len(predict["python_importing_the_libraries"]["runs"]) == 9
    assert str(trained.checkpoint) in predict["command"]


def test_choose_best_tiny_records_validation_accuracy_only(tmp_path, mnist_dir):
    results = run_tiny("choose_best.py", tmp_path / "choose_best.json", mnist_dir)
    assert len(results) == 1  # --tiny: the last candidate only
    for candidate in results.values():
        assert candidate["seed"] == 1 and candidate["minutes"] > 0
        (accuracy,) = candidate["val_accuracy"]  # --tiny: one epoch
        assert 0.0 <= accuracy <= 1.0
        assert "test_accuracy" not in candidate


def test_step_profile_tiny_writes_a_well_formed_results_file(tmp_path):
    out = tmp_path / "step_profile.json"  # random pixels: timing needs no dataset
    command = [sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), "--tiny"]
    proc = subprocess.run(
        [*command, "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert len(results["fast_pieces_ms_batch_96"]) == 9
    assert all(ms > 0 for ms in results["fast_pieces_ms_batch_96"].values())
    best = results["best_step_batch_128"]
    assert best["whole_ms"] > 0 and best["without_augmentation_ms"] > 0
    assert best["augmentation_alone_ms"] > 0
    ceiling = results["book_recipe_loop_ceiling"]
    assert len(ceiling["ratio_per_round"]) == 1 and ceiling["median_ratio"] > 0
