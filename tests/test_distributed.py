"""Sweeps over several processes (jax.distributed on localhost, CPU devices, Gloo collectives):
the results equal one process with the same device count bit for bit, only process 0 plans
from and writes the results file, and a killed job resumes to the same rows.

Every process runs tests/distributed_worker.py (train_many on a tiny grid, then run_sweep on
iris); the test compares what each process returned and what process 0 wrote."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(num_processes, local_devices, results, out, seeds, chunk, faults=None):
    """The worker processes (one alone when ``num_processes`` is 1); ``results`` and ``out``: one
    path per process; ``faults``: ``{process: DREG_JAX_FAULT}``."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DREG_JAX_FAULT")}
    # every worker and the one-process reference alike: the suite's fast-compile level (conftest)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    procs = []
    for i in range(num_processes):
        extra = {"DREG_JAX_FAULT": faults[i]} if faults and i in faults else {}
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(num_processes), str(port), str(local_devices), str(results[i]),
             str(out[i]), str(seeds), str(chunk)],
            env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def _finish(procs, timeout=300):
    outputs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append((p.returncode, err.decode()[-3000:]))
    return outputs


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _same_arrays(a, b):
    a, b = np.load(a), np.load(b)
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        assert np.array_equal(a[k], b[k], equal_nan=True), k


def _reference(tmp_path, devices, seeds, chunk):
    """One process with every device: its train_many arrays and its rows by run id."""
    ((code, err),) = _finish(_start(1, devices, [tmp_path / "one.jsonl"], [tmp_path / "one"], seeds, chunk))
    assert code == 0, err
    return {r["run_id"]: r for r in _rows(tmp_path / "one.jsonl")}


def _planted_rows(seeds):
    """Rows for the worker's sweep runs with seed 0, with a made-up accuracy: a process that read
    this file and planned on its own would skip those runs and return the made-up value."""
    from dreg_jax.engine import SweepConfig

    specs = SweepConfig(datasets=("iris",), activations=("gelu",), regularizers=("none", "dreg"), seeds=seeds,
                        epochs=2, hidden=(8,)).expand()
    return "".join(json.dumps({"run_id": s.run_id, "spec": s.to_dict(), "status": "ok",
                               "metrics": {"test_accuracy": 0.123}}) + "\n" for s in specs if s.seed == 0)


def test_two_processes_equal_one_process_and_only_process_0_plans_and_writes(tmp_path):
    # process 1 is given a file that holds made-up rows for half the runs, process 0 none: the
    # plan must come from process 0 alone, and nothing but process 0's file may be written
    theirs = tmp_path / "p1.jsonl"
    theirs.write_text(_planted_rows(seeds=2))
    ours = tmp_path / "p0.jsonl"
    reference = _start(1, 4, [tmp_path / "one.jsonl"], [tmp_path / "one"], seeds=2, chunk=64)
    job = _start(2, 2, [ours, theirs], [tmp_path / "o0", tmp_path / "o1"], seeds=2, chunk=64)
    outputs = _finish([*reference, *job])
    assert all(code == 0 for code, _ in outputs), outputs
    expected = {r["run_id"]: r for r in _rows(tmp_path / "one.jsonl")}
    assert len(expected) == 4 and {r["layout"]["devices"] for r in expected.values()} == {4}
    assert theirs.read_text() == _planted_rows(seeds=2)  # untouched
    rows = _rows(ours)
    assert sorted(r["run_id"] for r in rows) == sorted(expected)  # every run, once
    for r in rows:
        assert r["layout"] == {"devices": 4, "processes": 2, "vmap_width": 4}
        assert r["metrics"] == expected[r["run_id"]]["metrics"]  # bit for bit: the same layout per device
        assert r["curves"] == expected[r["run_id"]]["curves"]
    # every process got every run, from train_many and from run_sweep
    for i in (0, 1):
        _same_arrays(tmp_path / f"o{i}.npz", tmp_path / "one.npz")
        returned = json.loads((tmp_path / f"o{i}.json").read_text())
        assert {k: v["metrics"] for k, v in returned.items()} == {k: r["metrics"] for k, r in expected.items()}


@pytest.mark.slow  # four processes twice, and a reference
def test_four_processes_resume_after_one_is_killed_with_the_same_bits(tmp_path):
    reference = _reference(tmp_path, devices=4, seeds=4, chunk=4)
    assert len(reference) == 8
    ours = tmp_path / "p0.jsonl"
    paths = [ours] + [tmp_path / f"p{i}.jsonl" for i in (1, 2, 3)]
    outs = [tmp_path / f"o{i}" for i in range(4)]
    procs = _start(4, 1, paths, outs, seeds=4, chunk=4, faults={1: "sweep:chunk-done:kill"})
    procs[1].wait(timeout=300)  # process 1 SIGKILLs itself after the first chunk
    assert procs[1].returncode == -signal.SIGKILL
    time.sleep(1)
    for p in procs:  # a scheduler ends the rest of the job
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    _finish(procs)
    written = _rows(ours)
    assert 0 < len(written) < 8, len(written)
    outputs = _finish(_start(4, 1, paths, outs, seeds=4, chunk=4))
    assert all(code == 0 for code, _ in outputs), outputs
    rows = _rows(ours)
    assert rows[:len(written)] == written
    assert sorted(r["run_id"] for r in rows) == sorted(reference)  # complete, nothing twice
    for r in rows:
        assert r["metrics"] == reference[r["run_id"]]["metrics"]
        assert r["curves"] == reference[r["run_id"]]["curves"]
    assert not any(p.exists() for p in paths[1:])


@pytest.mark.slow  # two processes of the CLI
def test_cli_sweep_distributed_writes_once_with_the_layout(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    results = [tmp_path / "r0.jsonl", tmp_path / "elsewhere" / "r1.jsonl"]
    procs = [subprocess.Popen([sys.executable, "-m", "dreg_jax.cli", "sweep", "--datasets", "iris", "--activations", "gelu",
                               "--regularizers", "none", "dreg", "--seeds", "2", "--epochs", "1", "--hidden", "8",
                               "--results", str(results[i]), "--distributed", "--coordinator", f"localhost:{port}",
                               "--num-processes", "2", "--process-id", str(i), "--cpu-devices", "2", "--vmap-width", "4"],
                              env={**env, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in (0, 1)]
    outputs = [(p.wait(timeout=300), p.stdout.read().decode(), p.stderr.read().decode()[-2000:]) for p in procs]
    assert [code for code, _, _ in outputs] == [0, 0], outputs
    assert "4 device(s), 2 processes" in outputs[0][1], outputs[0][1]
    # process 1 prints no plan, table or summary of its own (Gloo and TFDS may log)
    assert not any(word in outputs[1][1] for word in ("runs ->", "test acc", "compiled programs")), outputs[1][1]
    rows = _rows(results[0])
    assert len(rows) == 4 and {json.dumps(r["layout"], sort_keys=True) for r in rows} == {
        json.dumps({"devices": 4, "processes": 2, "vmap_width": 4}, sort_keys=True)}
    assert not results[1].parent.exists()


def test_a_resume_on_another_layout_says_the_bits_may_differ(tmp_path):
    from dreg_jax.engine import EngineOptions, SweepConfig, run_sweep

    specs = SweepConfig(datasets=("iris",), activations=("gelu",), regularizers=("none",), seeds=2, epochs=1,
                        hidden=(4,)).expand()
    path = tmp_path / "r.jsonl"
    other = {"devices": 8, "processes": 1, "vmap_width": 8}
    path.write_text(json.dumps({"run_id": specs[0].run_id, "spec": specs[0].to_dict(), "status": "ok",
                                "metrics": {"test_accuracy": 0.5}, "layout": other}) + "\n")
    with pytest.warns(UserWarning, match=r"1 row\(s\) on .*\"devices\": 8.*differ in the last bits"):
        records = run_sweep(specs, path, options=EngineOptions(vmap_width=2), progress=False, report=False)
    assert records[1]["layout"] == {"devices": 1, "processes": 1, "vmap_width": 2}


# job arrays: shares of a grid, each in its own file, read back as one table

def _grid():
    from dreg_jax.engine import SweepConfig

    return SweepConfig(datasets=("iris",), activations=("gelu", "relu"), regularizers=("none", "dreg"), seeds=3,
                       epochs=1, hidden=(4,)).expand()


def _row(spec, accuracy):
    return {"run_id": spec.run_id, "spec": spec.to_dict(), "status": "ok", "metrics": {"test_accuracy": accuracy}}


def test_shares_partition_the_grid_and_keep_their_runs_when_it_grows():
    from dreg_jax.engine import shard_specs

    specs = _grid()
    shares = [shard_specs(specs, i, 3) for i in range(3)]
    ids = [s.run_id for share in shares for s in share]
    assert sorted(ids) == sorted(s.run_id for s in specs) and len(set(ids)) == len(ids)
    from dreg_jax.engine import SweepConfig

    grown = SweepConfig(datasets=("iris",), activations=("gelu", "relu"), regularizers=("none", "dreg"), seeds=5,
                        epochs=1, hidden=(4,)).expand()  # the grid with two more seeds
    for i in range(3):
        assert {s.run_id for s in shares[i]} <= {s.run_id for s in shard_specs(grown, i, 3)}
    with pytest.raises(ValueError, match="0 <= index < count"):
        shard_specs(specs, 3, 3)


def test_readers_take_several_files_and_patterns_and_refuse_rows_that_disagree(tmp_path, capsys):
    from dreg_jax.cli import main
    from dreg_jax.engine import load_records

    specs = _grid()
    for i in range(2):
        (tmp_path / f"part-{i}.jsonl").write_text(
            "".join(json.dumps(_row(s, 0.5)) + "\n" for j, s in enumerate(specs) if j % 2 == i))
    assert len(load_records(tmp_path / "part-*.jsonl")) == len(specs)
    assert len(load_records([tmp_path / "part-0.jsonl", tmp_path / "part-1.jsonl"])) == len(specs)
    same = tmp_path / "again.jsonl"  # a run in two files with the same results is one row
    same.write_text(json.dumps(_row(specs[0], 0.5)) + "\n")
    assert len(load_records([tmp_path / "part-*.jsonl", same])) == len(specs)
    assert main(["results", str(tmp_path / "part-*.jsonl")]) == 0
    assert f"{len(specs)} runs" in capsys.readouterr().out
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(_row(specs[0], 0.75)) + "\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=rf"run {specs[0].run_id} is in .*part-0.jsonl and in .*other.jsonl with "
                                         r"different metrics"):
        load_records([tmp_path / "part-*.jsonl", other])
    assert main(["results", str(tmp_path / "part-0.jsonl"), str(other)]) == 2
    assert "different metrics" in capsys.readouterr().err
    with pytest.raises(ValueError, match="matches no file"):
        load_records(tmp_path / "nothing-*.jsonl")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # readers never write


def test_cli_shares_train_their_runs_into_their_own_files(tmp_path, capsys):
    from dreg_jax.cli import main
    from dreg_jax.engine import load_records

    grid = ["--datasets", "iris", "--activations", "gelu", "--regularizers", "none", "--seeds", "3", "--epochs", "1",
            "--hidden", "4"]
    for i in range(2):
        assert main(["sweep", *grid, "--shard", f"{i}/2", "--results", str(tmp_path / f"part-{i}.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "shard 0/2:" in out and "shard 1/2:" in out
    rows = load_records(tmp_path / "part-*.jsonl")
    assert len(rows) == 3 and len({r["run_id"] for r in rows}) == 3
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", *grid, "--shard", "2/2"])
    assert exit_.value.code == 2 and "not a share I/N" in capsys.readouterr().err
