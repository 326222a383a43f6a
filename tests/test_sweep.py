"""Resumable sweeps: kill -9 mid-way and resume; torn writes; duplicates; CLI."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dreg_jax.cli import main as cli_main
from dreg_jax.engine import RunSpec, SweepConfig, run_sweep, summary_table

SWEEP_ARGS = ["sweep", "--datasets", "wine", "iris", "--activations", "gelu", "--regularizers",
              "none", "dreg", "--seeds", "3", "--epochs", "2", "--hidden", "8", "--chunk-size", "2",
              "--no-epoch-diagnostics"]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
def test_sigkill_mid_sweep_then_resume_runs_every_run_exactly_once(tmp_path):
    results = tmp_path / "results.jsonl"
    env = {**os.environ, "DREG_JAX_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "dreg_jax.cli", *SWEEP_ARGS, "--results", str(results)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not (results.exists() and results.read_text().count("\n") >= 2):
        if proc.poll() is not None:
            pytest.fail(f"sweep ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = results.read_text().count("\n")
    assert 2 <= partial < 12, "kill should land mid-sweep"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = _lines(results)
    ids = [r["run_id"] for r in records]
    assert len(ids) == 12 and len(set(ids)) == 12  # 2 datasets x 2 regularizers x 3 seeds, once each
    assert "12 runs (0 failed, 0 diverged)" in done.stdout
    expected = {s.run_id for s in SweepConfig(datasets=("wine", "iris"), activations=("gelu",),
                                               regularizers=("none", "dreg"), seeds=3, epochs=2,
                                               hidden=(8,)).expand()}
    assert set(ids) == expected


# torn, garbage and shadowing lines: the damage table in tests/test_reliability.py


def test_duplicate_specs_run_once_and_summary(tmp_path):
    spec = SweepConfig(datasets=("iris",), regularizers=("dreg",), seeds=1, epochs=1, hidden=(4,)).expand()[0]
    records = run_sweep([spec, spec], tmp_path / "r.jsonl", progress=False)
    assert len(records) == 2 and records[0] is records[1]
    assert len(_lines(tmp_path / "r.jsonl")) == 1
    assert RunSpec.from_dict(records[0]["spec"]).run_id == spec.run_id
    table = summary_table(records)
    assert "iris" in table and "dreg" in table


def test_cli_help_and_clear_errors(tmp_path, capsys):
    for sub in (["--help"], ["train", "--help"], ["sweep", "--help"], ["data", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(sub)
        assert exit_info.value.code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [wine]\nlearning_rate: 0.1\n")
    assert cli_main(["sweep", "--config", str(bad), "--results", str(tmp_path / "x.jsonl")]) == 2
    assert "unknown sweep key(s) ['learning_rate']; valid keys:" in capsys.readouterr().err
    assert cli_main(["train", "--fraction", "1.5"]) == 2
    assert "data_fraction must be in (0, 1]" in capsys.readouterr().err
    bad.write_text("regularizers: [dropout]\n")
    assert cli_main(["sweep", "--config", str(bad), "--results", str(tmp_path / "x.jsonl")]) == 2
    assert "none, weight_decay, spectral_norm" in capsys.readouterr().err
    assert cli_main(["train", "--regularizer", "igpen", "--strength-schedule", "cosine_decay"]) == 2
    assert "apply to the dreg regularizer only; add dreg to regularizers" in capsys.readouterr().err
    bad.write_text("strength_schedules: [exponential]\nregularizers: [dreg]\n")
    assert cli_main(["sweep", "--config", str(bad), "--results", str(tmp_path / "x.jsonl")]) == 2
    assert "unknown strength_schedule 'exponential'" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()  # rejected before anything ran


def test_cli_train_with_patience_keeps_the_best_epoch(tmp_path, capsys):
    """``--patience``: refused without a validation split (before training); with one the run
    stops by itself, and its metrics are the kept epoch's, read against its own curves."""
    assert cli_main(["train", "--dataset", "iris", "--patience", "2"]) == 2
    assert "add --validation-fraction 0.2" in capsys.readouterr().err
    out = tmp_path / "run.json"
    assert cli_main(["train", "--dataset", "iris", "--epochs", "40", "--hidden", "8", "--validation-fraction", "0.3",
                     "--patience", "2", "--learning-rate", "0.05", "--out", str(out)]) == 0
    assert "early stopping: ran" in capsys.readouterr().out
    result = json.loads(out.read_text())
    m, val = result["metrics"], result["curves"]["validation_accuracy"]
    ran = [v for v in val if v is not None]  # NaN (JSON null) after the stop
    assert len(ran) == m["epochs_run"] and m["best_epoch"] == int(np.argmax(ran)) + 1
    assert m["epochs_run"] == 40 or m["epochs_run"] - m["best_epoch"] == 2
    assert m["validation_accuracy"] == pytest.approx(max(ran), abs=1e-6)


def test_results_and_plot_read_what_train_out_writes(tmp_path, capsys, monkeypatch):
    """``train --out`` writes the row ``sweep`` writes: ``results`` and ``plot`` read it."""
    out = tmp_path / "run.json"
    assert cli_main(["train", "--dataset", "iris", "--epochs", "2", "--hidden", "8", "--out", str(out)]) == 0
    capsys.readouterr()
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["status"] == "ok" and row["layout"] == {"devices": 1, "processes": 1, "vmap_width": 1}
    assert cli_main(["results", str(out)]) == 0
    table = capsys.readouterr().out
    assert "iris" in table and "dreg" in table and "1 runs" in table
    import dreg_jax.analysis.results as results_module

    figures = []
    real_save = results_module.save_figure
    monkeypatch.setattr(results_module, "save_figure", lambda fig, path, **kw: figures.append(fig) or real_save(fig, path, **kw))
    assert cli_main(["plot", str(out), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "accuracy_by_regularizer.png").stat().st_size > 0
    accuracy, curves = figures
    assert not accuracy.axes[0].patches  # dots and intervals, no bars from 0
    data_loss, penalty, _ = curves.axes
    assert data_loss.get_ylabel().startswith("data loss") and penalty.get_ylabel().startswith("penalty")
    expected = np.asarray(row["curves"]["train_loss"]) - np.asarray(row["curves"]["penalty"])
    np.testing.assert_allclose(data_loss.lines[0].get_ydata(), expected, rtol=1e-6)
    np.testing.assert_allclose(penalty.lines[0].get_ydata(), row["curves"]["penalty"], rtol=1e-6)
    assert results_module.value_label(0.0031622776601683794) == "3.2e-03" and results_module.value_label("gelu") == "gelu"


@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
def test_cli_train_and_data_list(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert cli_main(["train", "--dataset", "iris", "--epochs", "2", "--hidden", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0 <= result["metrics"]["test_accuracy"] <= 1 and len(result["curves"]["train_loss"]) == 2
    assert cli_main(["data", "list"]) == 0
    listing = capsys.readouterr().out
    assert "digits" in listing and "offline" in listing


def _run_until(cmd, env, results, moment):
    """Starts the sweep and SIGKILLs it at ``moment``: ("seconds", s) or ("lines", n, extra_delay)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    start, deadline = time.time(), time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            return False  # finished before the moment came
        lines = results.read_text().count("\n") if results.exists() else 0
        if (moment[0] == "seconds" and time.time() - start >= moment[1]) or (moment[0] == "lines" and lines >= moment[1]):
            if moment[0] == "lines" and moment[2]:
                time.sleep(moment[2])
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    proc.kill()
    pytest.fail("sweep did not reach the kill moment")


@pytest.mark.slow
def test_kill_at_five_moments_then_resume_gives_the_same_bits(tmp_path):
    env = {**os.environ, "DREG_JAX_CACHE": str(tmp_path / "cache")}
    base = [sys.executable, "-m", "dreg_jax.cli", *SWEEP_ARGS]
    reference = tmp_path / "reference.jsonl"
    subprocess.run([*base, "--results", str(reference)], env=env, check=True, capture_output=True, timeout=600)
    expected = {r["run_id"]: (r["metrics"], r["curves"]) for r in _lines(reference)}
    moments = {"startup/compile": ("seconds", 1.0), "right after the first write": ("lines", 2, 0),
               "mid-chunk": ("lines", 2, 0.3), "right after the second write": ("lines", 4, 0),
               "near the end": ("lines", 10, 0)}
    killed = 0
    for name, moment in moments.items():
        results = tmp_path / f"{name.replace(' ', '_').replace('/', '_')}.jsonl"
        killed += _run_until([*base, "--results", str(results)], env, results, moment)
        done = subprocess.run([*base, "--results", str(results)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        got = {r["run_id"]: (r["metrics"], r["curves"]) for r in _lines(results)}
        assert got == expected, f"kill at {name}: results differ from the uninterrupted sweep"
    assert killed >= 4  # the moments really interrupted the sweep


def test_cli_strengths_grid_goes_to_every_regularizer_with_a_strength(tmp_path):
    from dreg_jax.cli import _sweep_config, build_parser

    args = build_parser().parse_args(["sweep", "--datasets", "iris", "--regularizers", "none", "dreg", "weight_decay",
                                      "--strengths", "0.1", "0.01", "--seeds", "1", "--results", str(tmp_path / "r.jsonl")])
    specs = _sweep_config(args).expand()
    got = sorted((s.config.regularizer.kind, s.config.regularizer.strength) for s in specs)
    assert got == [("dreg", 0.01), ("dreg", 0.1), ("none", None), ("weight_decay", 0.01), ("weight_decay", 0.1)]


def test_summary_shows_validation_beside_test_accuracy():
    record = {"run_id": "x", "status": "ok", "metrics": {"test_accuracy": 0.8, "validation_accuracy": 0.7},
              "spec": {"dataset": "d", "seed": 0, "data_fraction": 1.0, "label_noise": 0.0, "input_noise": 0.0,
                       "config": {"model": {"activation": "gelu", "hidden": [8]}, "epochs": 1, "batch_size": 8,
                                  "regularizer": {"kind": "dreg", "strength": 0.1},
                                  "optimizer": {"learning_rate": 1e-3}}}}
    table = summary_table([record])
    assert "val acc %" in table.splitlines()[0] and "70.00" in table and "80.00" in table
    del record["metrics"]["validation_accuracy"]
    assert "val acc %" not in summary_table([record])
