"""Reliability: damaged results files lose no valid row; same bits whatever the chunking;
diverged runs flagged; strict JSON; clear errors for bad configs and inputs."""
import json
import math
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreg_jax.cli import main as cli_main
from dreg_jax.engine import EngineOptions, ResultsFile, RunSpec, SweepConfig, run_sweep
from dreg_jax.engine.sweep import record_problem

TINY = dict(datasets=("iris",), activations=("gelu",), regularizers=("none", "dreg"), seeds=2,
            epochs=2, hidden=(8,))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Two valid rows of a finished tiny sweep (computed once for the damage table)."""
    path = tmp_path_factory.mktemp("finished") / "r.jsonl"
    specs = SweepConfig(**{**TINY, "regularizers": ("none",)}).expand()
    records = run_sweep(specs, path, progress=False, options=EngineOptions(per_epoch_diagnostics=False))
    return [json.dumps(r, sort_keys=True).encode() for r in records], records


def _damage_cases(good):
    a, b = good
    no_metrics = json.loads(b)
    del no_metrics["metrics"]
    other_id = json.loads(a)
    other_id["run_id"] = "0" * 16
    bad_status = json.loads(a)
    bad_status["status"] = "maybe"
    return {
        # name: (file bytes, expected run_ids loaded, expected messages, lines set aside)
        "torn last line": (a + b"\n" + b[: len(b) // 2], ["a"], ["r.jsonl:2: an unterminated last line that does not parse"], 1),
        "torn middle line": (a[: len(a) // 2] + b"\n" + b + b"\n", ["b"], ["r.jsonl:1: not valid JSON"], 1),
        "garbage": (b"hello world\n" + a + b"\n" + b + b"\n", ["a", "b"], ["r.jsonl:1: not valid JSON (Expecting value at column 1)"], 1),
        "binary": (a + b"\n\xff\xfe\x00\x01\n" + b + b"\n", ["a", "b"], ["r.jsonl:2: binary bytes, not UTF-8 text"], 1),
        "empty object": (b"{}\n" + a + b"\n" + b + b"\n", ["a", "b"], ["r.jsonl:1: row has no 'run_id'"], 1),
        "list": (a + b"\n[1, 2]\n" + b + b"\n", ["a", "b"], ["r.jsonl:2: a JSON list, not a results row (an object)"], 1),
        "number": (a + b"\n42\n" + b + b"\n", ["a", "b"], ["r.jsonl:2: a JSON int, not a results row"], 1),
        "missing metrics shadows good row": (a + b"\n" + json.dumps(no_metrics).encode() + b"\n" + b + b"\n",
                                             ["a", "b"], ["r.jsonl:2: row has no 'metrics'"], 1),
        "missing trailing newline": (a + b"\n" + b, ["a", "b"], ["r.jsonl:2: valid last row had no trailing newline; added one"], 0),
        "blank lines": (b"\n\n" + a + b"\n  \n" + b + b"\n\n", ["a", "b"], [], 0),
        "duplicate row": (a + b"\n" + a + b"\n" + b + b"\n", ["a", "b"], [], 0),
        "run_id does not match spec": (json.dumps(other_id).encode() + b"\n" + b + b"\n", ["b"],
                                       ["r.jsonl:1: row spec hashes to"], 1),
        "unknown status": (json.dumps(bad_status).encode() + b"\n" + b + b"\n", ["b"],
                           ["r.jsonl:1: row status 'maybe' is not one of ok, failed, diverged"], 1),
        "bare NaN (older files)": (a.replace(b'"volatility_peak": ', b'"volatility_peak": NaN, "x": ') + b"\n" + b + b"\n",
                                   ["a", "b"], [], 0),
        "empty file": (b"", [], [], 0),
        "CRLF endings": (a + b"\r\n" + b + b"\r\n", ["a", "b"], [], 0),
    }


CASES = ["torn last line", "torn middle line", "garbage", "binary", "empty object", "list", "number",
         "missing metrics shadows good row", "missing trailing newline", "blank lines", "duplicate row",
         "run_id does not match spec", "unknown status", "bare NaN (older files)", "empty file", "CRLF endings"]


@pytest.mark.parametrize("case", CASES)
def test_results_damage_table_loses_no_valid_row(case, finished, tmp_path):
    good, records = finished
    ids = {"a": records[0]["run_id"], "b": records[1]["run_id"]}
    content, expect_ids, expect_messages, set_aside = _damage_cases(good)[case]
    path = tmp_path / "r.jsonl"
    path.write_bytes(content)
    # a reader reports and skips, and leaves the file byte-identical
    before, read_messages = path.read_bytes(), []
    assert sorted(ResultsFile(path, log=read_messages.append).load()) == sorted(ids[i] for i in expect_ids)
    assert path.read_bytes() == before and not (tmp_path / "r.jsonl.rejected").exists()
    assert len(read_messages) == set_aside
    # the writer (a sweep about to append) sets bad lines aside
    messages = []
    loaded = ResultsFile(path, log=messages.append).load(repair=True)
    assert sorted(loaded) == sorted(ids[i] for i in expect_ids)
    for expected in expect_messages:
        assert any(expected in m for m in messages), (expected, messages)
    if set_aside:
        rejected = [json.loads(line) for line in (tmp_path / "r.jsonl.rejected").read_text().splitlines()]
        assert len(rejected) == set_aside and all(r["reason"] and "text" in r for r in rejected)
        assert all("moved to" in m and "r.jsonl.rejected" in m for m in messages)
    else:
        assert not (tmp_path / "r.jsonl.rejected").exists()
    # loading again is clean: the file now holds only valid rows, each once, newline-terminated
    again = []
    assert sorted(ResultsFile(path, log=again.append).load(repair=True)) == sorted(loaded)
    assert again == [] and (not path.read_bytes() or path.read_bytes().endswith(b"\n"))


def test_damaged_row_is_redone_by_the_next_sweep(finished, tmp_path):
    good, records = finished
    path = tmp_path / "r.jsonl"
    broken = json.loads(good[1])
    del broken["metrics"]
    path.write_bytes(good[0] + b"\n" + json.dumps(broken).encode() + b"\n")
    specs = [RunSpec.from_dict(r["spec"]) for r in records]
    redone = run_sweep(specs, path, progress=False, options=EngineOptions(per_epoch_diagnostics=False))
    assert [r["run_id"] for r in redone] == [r["run_id"] for r in records]
    assert redone[1]["metrics"]["test_accuracy"] == records[1]["metrics"]["test_accuracy"]
    assert len(ResultsFile(path).load()) == 2


def test_unwritable_results_path_fails_before_compute(tmp_path, capsys):
    read_only = tmp_path / "ro.jsonl"
    read_only.write_text("")
    read_only.chmod(stat.S_IRUSR)
    specs = SweepConfig(**TINY).expand()
    with pytest.raises(OSError, match="is read-only"):
        run_sweep(specs, read_only, progress=False)
    with pytest.raises(OSError, match="is a directory"):
        run_sweep(specs, tmp_path, progress=False)
    (tmp_path / "file").write_text("x")
    assert cli_main(["sweep", "--datasets", "iris", "--results", str(tmp_path / "file" / "r.jsonl")]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_chunking_and_resume_give_the_same_bits(tmp_path):
    specs = SweepConfig(**{**TINY, "seeds": 4}).expand()  # 8 runs, 2 groups of 4
    options = EngineOptions(per_epoch_diagnostics=False, vmap_width=4)
    whole = run_sweep(specs, tmp_path / "whole.jsonl", chunk_size=64, options=options, progress=False)
    for size in (1, 3):
        other = run_sweep(specs, tmp_path / f"c{size}.jsonl", chunk_size=size, options=options, progress=False)
        assert [r["metrics"] for r in other] == [r["metrics"] for r in whole]
    # resumed from a partial file (a kill after the first chunk): the same bits
    partial = tmp_path / "resumed.jsonl"
    ResultsFile(partial).append([whole[0], whole[5]])
    resumed = run_sweep(specs, partial, chunk_size=64, options=options, progress=False)
    assert [r["metrics"] for r in resumed] == [r["metrics"] for r in whole]
    assert [r["curves"] for r in resumed] == [r["curves"] for r in whole]


def test_diverged_runs_are_flagged_and_rows_are_strict_json(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    argv = ["sweep", "--datasets", "iris", "--activations", "gelu", "--regularizers", "none", "--seeds", "2",
            "--epochs", "3", "--hidden", "8", "--learning-rates", "1e-3", "1e6", "--no-epoch-diagnostics",
            "--results", str(path)]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
            for line in path.read_text().splitlines()]
    by_lr = {}
    for r in rows:
        by_lr.setdefault(r["hparams"]["learning_rate"], []).append(r)
    assert all(r["status"] == "ok" for r in by_lr[1e-3])
    assert all(r["status"] in ("diverged", "failed") for r in by_lr[1e6])
    assert any(r["status"] == "diverged" and r["diverge_step"] >= 0 for r in by_lr[1e6])
    assert "learning rate 1000000.0" in out and "diverged" in out
    assert any(line.startswith("dataset") and "diverged" in line for line in out.splitlines())  # summary column


@pytest.mark.parametrize("yaml_text,message", [
    ("seeds: '10'\n", "seeds must be a positive count"),
    ("epochs: 2.5\n", "epochs must be a positive integer, got 2.5"),
    ("learning_rates: [.inf]\n", "learning_rates must be a finite number"),
    ("strengths: {dreg: .nan}\n", "strengths['dreg'] must be a finite number >= 0"),
    ("", "is empty; give at least one sweep key"),
    ("datasets: [iris\n", "is not valid YAML at line 2"),
    ("activation: [gelu]\n", "did you mean 'activations'?"),
    ("activations: [gleu]\n", "unknown activation 'gleu'; did you mean 'gelu'?"),
    ("datasets: [digitz]\n", "did you mean 'digits'?"),
])
def test_config_errors_are_one_line(tmp_path, capsys, yaml_text, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    assert cli_main(["sweep", "--config", str(config), "--results", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.jsonl").exists()


def test_cli_usage_errors_are_short(capsys):
    for argv, message in ((["sweep", "--chunk-size", "0"], "expected a positive integer, got 0"),
                          (["sweep", "--chunk-size", "-1"], "expected a positive integer, got -1"),
                          (["train", "--dataset", "wine.csv"], "unknown dataset 'wine.csv'"),
                          (["train", "--activation", "gleu"], "invalid choice: 'gleu'")):
        with pytest.raises(SystemExit) as info:
            cli_main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err) < 600, err


def test_train_checks_out_path_before_training(tmp_path, capsys):
    assert cli_main(["train", "--dataset", "iris", "--epochs", "1", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_silently_wrong_values_are_now_right_or_refused():
    import dreg_jax

    layer = dreg_jax.ChainzRule()
    x_int = jnp.arange(6).reshape(2, 3)
    params = layer.init(jax.random.key(0), x_int.astype(jnp.float32))
    np.testing.assert_allclose(layer.apply(params, x_int), layer.apply(params, x_int.astype(jnp.float32)))
    assert float(jnp.abs(layer.apply(params, x_int)).sum()) > 0
    with pytest.raises(ValueError, match="empty batch"):
        dreg_jax.layer_jacobian_sq_norms([jnp.tanh], jnp.zeros((0, 3)), jax.random.key(0))
    with pytest.raises(ValueError, match="l2 must be a finite scalar >= 0"):
        dreg_jax.coherent_strong_regularization(l2=-1.0)
    from dreg_jax.engine import RunHParams
    with pytest.raises(ValueError, match="strength must be >= 0"):
        RunHParams.stack([RunHParams(0, 1e-3, -1.0, 1.0, 0.0, 0.0)]).validate()
    with pytest.raises(ValueError, match="learning_rate must be finite"):
        RunHParams.stack([RunHParams(0, math.inf, 0.0, 1.0, 0.0, 0.0)]).validate()
    with pytest.raises(ValueError, match="strength must be a finite scalar >= 0"):
        dreg_jax.RegularizerConfig(kind="dreg", strength=math.nan).validate()


def test_damaged_dataset_cache_is_rebuilt(tmp_path, capsys):
    from dreg_jax.data import builders

    data_dir = tmp_path / "tfds"
    builders.read_offline("iris", 3, 4, data_dir)
    prepared = data_dir / "dreg_iris" / builders.VERSION
    info = prepared / "dataset_info.json"
    info.write_text(info.read_text()[:40])  # truncated metadata
    splits = builders.read_offline("iris", 3, 4, data_dir)
    assert "is damaged" in capsys.readouterr().err and len(splits["train"][1]) > 0
    meta = json.loads(info.read_text())
    for split in meta["splits"]:  # metadata edited to claim fewer rows than the shards hold
        split["shardLengths"] = [str(int(n) - 10) for n in split["shardLengths"]]
    info.write_text(json.dumps(meta))
    again = builders.read_offline("iris", 3, 4, data_dir)
    assert "shards hold" in capsys.readouterr().err
    assert len(again["train"][1]) == len(splits["train"][1])


def _snapshot(paths):
    return {p: (p.read_bytes(), p.stat().st_mode) for p in paths}


def test_reader_commands_leave_every_file_byte_identical(finished, tmp_path, capsys):
    good, _ = finished
    csv = tmp_path / "wine.csv"
    csv.write_text("alcohol,malic,class\n" + "".join(f"{i}.1,{i}.2,{i % 3}\n" for i in range(179)))
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_bytes(good[0] + b"\n{not json\n" + good[1])  # a bad middle line, no final newline
    read_only = tmp_path / "ro.jsonl"
    read_only.write_bytes(good[0] + b"\ngarbage\n")
    read_only.chmod(stat.S_IRUSR)
    files = [csv, damaged, read_only]
    before = _snapshot(files)
    listing = sorted(os.listdir(tmp_path))
    for path in files:
        for command in (["results", str(path)], ["plot", str(path), "--out", str(tmp_path / "plots")]):
            code = cli_main(command)
            err = capsys.readouterr().err
            if path == csv:
                assert code == 2 and "is not a dreg_jax results file" in err and "left untouched" in err
                assert len(err.strip().splitlines()) == 1
            elif command[0] == "results":
                assert code == 0 and "skipped (the file is left as it is)" in err
    assert _snapshot(files) == before
    assert sorted(p for p in os.listdir(tmp_path) if p != "plots") == listing  # no .rejected, no .tmp
    # a sweep pointed at the CSV refuses it, untouched
    with pytest.raises(ValueError, match="not a dreg_jax results file"):
        run_sweep(SweepConfig(**TINY).expand()[:1], csv, progress=False)
    assert csv.read_bytes() == before[csv][0]


def test_writes_through_a_symlink_reach_its_target_and_share_its_lock(finished, tmp_path):
    import fcntl

    good, records = finished
    target = tmp_path / "real.jsonl"
    target.write_bytes(good[0] + b"\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    store = ResultsFile(link)
    store.append([json.loads(good[1])])
    assert link.is_symlink() and len(ResultsFile(target).load()) == 2
    other = tmp_path / "other_name.jsonl"
    other.symlink_to(target)
    assert ResultsFile(other).lock_path == ResultsFile(target).lock_path == store.lock_path
    with open(store.lock_path, "w") as held:  # a sweep holding the file through one name ...
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another sweep is writing"):  # ... refuses the other
            run_sweep([RunSpec.from_dict(records[0]["spec"])], other, progress=False)


def test_row_with_an_unknown_field_survives_reads_and_the_writer(finished, tmp_path):
    good, _ = finished
    newer = json.loads(good[1])
    newer["spec"]["config"]["regularizer"]["future_option"] = 3
    newer["run_id"] = "0123456789abcdef"
    path = tmp_path / "r.jsonl"
    content = good[0] + b"\n" + json.dumps(newer).encode() + b"\n"
    path.write_bytes(content)
    loaded = ResultsFile(path).load(repair=True)
    assert loaded["0123456789abcdef"]["spec"]["config"]["regularizer"]["future_option"] == 3
    assert path.read_bytes() == content
