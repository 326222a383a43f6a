"""Resumable sweeps: kill -9 mid-way and resume; torn writes; duplicates; CLI."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dreg_jax.cli import main as cli_main
from dreg_jax.engine import ResultsFile, RunSpec, SweepConfig, run_sweep, summary_table

SWEEP_ARGS = ["sweep", "--datasets", "wine", "iris", "--activations", "gelu", "--regularizers",
              "none", "dreg", "--seeds", "3", "--epochs", "2", "--hidden", "8", "--chunk-size", "2",
              "--no-epoch-diagnostics"]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    assert "12 runs (0 failed)" in done.stdout
    expected = {s.run_id for s in SweepConfig(datasets=("wine", "iris"), activations=("gelu",),
                                               regularizers=("none", "dreg"), seeds=3, epochs=2,
                                               hidden=(8,)).expand()}
    assert set(ids) == expected


def test_torn_last_line_is_cut_and_redone(tmp_path):
    path = tmp_path / "r.jsonl"
    good = [{"run_id": "a", "x": 1}, {"run_id": "b", "x": 2}]
    ResultsFile(path).append(good)
    with open(path, "ab") as f:
        f.write(b'{"run_id": "c", "x"')  # a write cut by SIGKILL
    loaded = ResultsFile(path).load()
    assert sorted(loaded) == ["a", "b"]
    assert path.read_text().endswith("\n") and path.read_text().count("\n") == 2
    ResultsFile(path).append([{"run_id": "c", "x": 3}])
    assert sorted(ResultsFile(path).load()) == ["a", "b", "c"]


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


def test_cli_train_and_data_list(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert cli_main(["train", "--dataset", "iris", "--epochs", "2", "--hidden", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0 <= result["metrics"]["test_accuracy"] <= 1 and len(result["curves"]["train_loss"]) == 2
    assert cli_main(["data", "list"]) == 0
    listing = capsys.readouterr().out
    assert "digits" in listing and "offline" in listing
