"""No command writes over its own inputs or through a planted link, refusals come before any
work in one line, flags that do not apply are refused, predict streams whole files, and a
diverged run is never saved or picked. Every pre-existing file is byte-identical afterwards
unless the command's job was to replace it."""
import csv
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import dreg_jax
from dreg_jax.cli import main
from dreg_jax.data import from_csv
from dreg_jax.training.train import build_model

from conftest import file_snapshot, one_line_refusal

CONFIG = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(8,)), epochs=2, batch_size=16)


def _table(path, n=80, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "color", "label"])
        for _ in range(n):
            a, b = rng.normal(), rng.normal()
            w.writerow([f"{a:.4f}", f"{b:.4f}", rng.choice(["red", "blue"]), "yes" if a + b > 0 else "no"])
    return path


@pytest.fixture
def work(tmp_path):
    """A table, a saved model of its columns (untrained weights: these tests are about files)."""
    data = _table(tmp_path / "d.csv")
    ds = from_csv(data, "label", validation_fraction=0.2)
    v = build_model(CONFIG, 2).init(jax.random.key(0), np.zeros((1, ds.num_features), np.float32))
    dreg_jax.save_model(tmp_path / "M", {"params": v["params"]}, CONFIG, 2, ds.num_features,
                        preprocessing=ds.preprocessing)
    (tmp_path / "r.jsonl").write_text("not a results file\n")
    return tmp_path


def _run(work, capsys, argv):
    argv = [a.format(w=work) for a in argv]
    before = file_snapshot(work)
    code = main(argv)
    return code, before


# name: (argv, words of the one-line refusal). Each is refused before any work, changing nothing.
REFUSALS = {
    "predict --out is model.json": (["predict", "--model", "{w}/M", "--csv", "{w}/d.csv", "--out", "{w}/M/model.json"],
                                    ["--out", "model.json", "input --model"]),
    "predict --out is variables": (["predict", "--model", "{w}/M", "--csv", "{w}/d.csv", "--out", "{w}/M/variables.msgpack"],
                                   ["--out", "--model"]),
    "predict --out new file inside the model": (["predict", "--model", "{w}/M", "--csv", "{w}/d.csv", "--out",
                                                 "{w}/M/p.csv"], ["lies inside the input --model"]),
    "predict --out is --csv": (["predict", "--model", "{w}/M", "--csv", "{w}/d.csv", "--out", "{w}/d.csv"],
                               ["--out", "input --csv"]),
    "predict --out hard link of --csv": (["predict", "--model", "{w}/M", "--csv", "{w}/d.csv", "--out", "{w}/hard.csv"],
                                         ["--out", "input --csv"]),
    "predict --out symlink": (["predict", "--model", "{w}/M", "--csv", "{w}/d.csv", "--out", "{w}/link.csv"],
                              ["--out", "symbolic link"]),
    "predict --out a directory": (["predict", "--model", "{w}/M", "--csv", "{w}/d.csv", "--out", "{w}/M"],
                                  ["--out", "is a directory"]),
    "predict --out under a file": (["predict", "--model", "{w}/M", "--csv", "{w}/d.csv", "--out", "{w}/d.csv/p.csv"],
                                   ["--out", "which is a file"]),
    "predict --model missing": (["predict", "--model", "{w}/nope", "--csv", "{w}/d.csv", "--out", "{w}/p.csv"],
                                ["nope", "not a saved model"]),
    "predict --csv missing": (["predict", "--model", "{w}/M", "--csv", "{w}/nope.csv", "--out", "{w}/p.csv"],
                              ["nope.csv", "does not exist"]),
    "train --out is --csv": (["train", "--csv", "{w}/d.csv", "--target", "label", "--out", "{w}/d.csv"],
                             ["--out", "input --csv"]),
    "train --out hard link of --csv": (["train", "--csv", "{w}/d.csv", "--target", "label", "--out", "{w}/hard.csv"],
                                       ["--out", "input --csv"]),
    "train --out is --test-csv": (["train", "--csv", "{w}/d.csv", "--target", "label", "--test-csv", "{w}/t.csv",
                                   "--out", "{w}/t.csv"], ["--out", "input --test-csv"]),
    "train --save-model is a file": (["train", "--csv", "{w}/d.csv", "--target", "label", "--save-model", "{w}/d.csv"],
                                     ["is a file"]),
    "train --save-model nested under --out": (["train", "--csv", "{w}/d.csv", "--target", "label", "--out",
                                               "{w}/run.json", "--save-model", "{w}/run.json/m"], ["overlap"]),
    "train --save-model holds other files": (["train", "--csv", "{w}/d.csv", "--target", "label", "--save-model", "{w}"],
                                             ["holds other files"]),
    "train --save-model a link": (["train", "--csv", "{w}/d.csv", "--target", "label", "--save-model", "{w}/linkdir"],
                                  ["symbolic link"]),
    "train --save-model planted model.json link": (["train", "--csv", "{w}/d.csv", "--target", "label", "--save-model",
                                                    "{w}/planted"], ["is a link"]),
    "train --save-model read-only": (["train", "--csv", "{w}/d.csv", "--target", "label", "--save-model", "{w}/ro/m"],
                                     ["read-only"]),
    "train --out read-only": (["train", "--csv", "{w}/d.csv", "--target", "label", "--out", "{w}/ro.json"],
                              ["read-only"]),
    "train --out inside --save-model": (["train", "--csv", "{w}/d.csv", "--target", "label", "--out", "{w}/M/run.json",
                                         "--save-model", "{w}/M"], ["overlap"]),
    "train --out is --config": (["train", "--config", "{w}/c.yaml", "--out", "{w}/c.yaml"], ["--out", "input --config"]),
    "train --test-csv without --csv": (["train", "--dataset", "iris", "--test-csv", "{w}/nope.csv"],
                                       ["--test-csv", "--csv FILE"]),
    "train --drop without --csv": (["train", "--dataset", "iris", "--drop", "a"], ["--drop", "--csv FILE"]),
    "train --encoding without --csv": (["train", "--dataset", "iris", "--encoding", "latin-1"], ["--encoding"]),
    "train --split-seed without --csv": (["train", "--dataset", "iris", "--split-seed", "3"], ["--split-seed"]),
    "train --target without --csv": (["train", "--dataset", "iris", "--target", "label"], ["--target"]),
    "train --keep without --csv": (["train", "--dataset", "iris", "--keep", "a"], ["--keep"]),
    "sweep --test-csv without --csv": (["sweep", "--datasets", "pima", "--test-csv", "{w}/x.csv"], ["--test-csv"]),
    "sweep two flags without --csv": (["sweep", "--datasets", "pima", "--drop", "a", "--split-seed", "1"],
                                      ["--drop, --split-seed apply"]),
    "sweep --results is --csv": (["sweep", "--csv", "{w}/d.csv", "--target", "label", "--results", "{w}/d.csv"],
                                 ["--results", "input --csv"]),
    "sweep --results is --config": (["sweep", "--config", "{w}/c.yaml", "--results", "{w}/c.yaml"], ["--results"]),
    "tune --test-csv without --csv": (["tune", "--datasets", "iris", "--test-csv", "{w}/x.csv"], ["--test-csv"]),
    "tune --out holds --csv": (["tune", "--csv", "{w}/d.csv", "--target", "label", "--out", "{w}/d.csv"],
                               ["--out", "is a file"]),
    "tune --save-model a file": (["tune", "--csv", "{w}/d.csv", "--target", "label", "--out", "{w}/tuned",
                                  "--save-model", "{w}/d.csv"], ["--save-model", "is a file"]),
    "tune --save-model and --out overlap": (["tune", "--csv", "{w}/d.csv", "--target", "label", "--out", "{w}/T",
                                             "--save-model", "{w}/T/models"], ["overlap"]),
    "tune --save-model kind holds other files": (["tune", "--csv", "{w}/d.csv", "--target", "label", "--regularizers",
                                                  "dreg", "--out", "{w}/tuned", "--save-model", "{w}/S"],
                                                 ["holds other files"]),
    "results --csv is the results file": (["results", "{w}/r.jsonl", "--csv", "{w}/r.jsonl"],
                                          ["--csv", "results file"]),
    "results --csv a link": (["results", "{w}/r.jsonl", "--csv", "{w}/link.csv"], ["symbolic link"]),
    "plot --out is the results file": (["plot", "{w}/r.jsonl", "--out", "{w}/r.jsonl"], ["is a file"]),
    "config YAML alias bomb": (["sweep", "--config", "{w}/bomb.yaml"], ["YAML alias"]),
    "config too large": (["sweep", "--config", "{w}/big.yaml"], ["bytes"]),
    "config nested deep": (["sweep", "--config", "{w}/deep.json"], ["deep.json"]),
}


def _prepare(work):
    os.link(work / "d.csv", work / "hard.csv")
    (work / "target.csv").write_text("keep me")
    (work / "link.csv").symlink_to("target.csv")
    _table(work / "t.csv", 40, 1)
    (work / "ro.json").write_text("{}")
    (work / "ro.json").chmod(0o444)
    (work / "ro").mkdir()
    (work / "ro").chmod(0o555)
    (work / "c.yaml").write_text("datasets: [iris]\nepochs: 1\n")
    (work / "linkdir").symlink_to("M")
    (work / "planted").mkdir()
    (work / "planted" / "model.json").symlink_to("../target.csv")
    (work / "S" / "dreg").mkdir(parents=True)
    (work / "S" / "dreg" / "notes.txt").write_text("mine")
    (work / "bomb.yaml").write_text('a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
                                    'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n')
    (work / "big.yaml").write_text("# " + "x" * (2 ** 20 + 10) + "\ndatasets: [iris]\n")
    (work / "deep.json").write_text("[" * 100000 + "]" * 100000)


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_before_any_work_changing_nothing(case, work, capsys):
    argv, words = REFUSALS[case]
    _prepare(work)
    code, before = _run(work, capsys, argv)
    for p in (work / "ro",):
        p.chmod(0o755)
    err = one_line_refusal(capsys, code, *words)
    assert "training" not in capsys.readouterr().out, err  # refused before anything trained
    after = file_snapshot(work)
    assert after == before, sorted(set(after) ^ set(before))


def test_predict_streams_a_file_in_chunks_exactly(work, capsys):
    model = dreg_jax.load_model(work / "M")
    whole_labels, whole_p, whole_lines = model.predict_csv(work / "d.csv")
    chunks = list(model.predict_csv_chunks(work / "d.csv", chunk_rows=7))
    assert len(chunks) == 12
    assert sum((c[0] for c in chunks), []) == whole_labels
    assert sum((list(c[2]) for c in chunks), []) == whole_lines
    np.testing.assert_allclose(np.concatenate([c[1] for c in chunks]), whole_p, rtol=1e-6, atol=1e-7)
    before = (work / "d.csv").read_bytes()
    assert main(["predict", "--model", str(work / "M"), "--csv", str(work / "d.csv"), "--out", str(work / "p.csv")]) == 0
    rows = list(csv.reader(open(work / "p.csv")))
    assert rows[0][:2] == ["line", "predicted"] and len(rows) == 81
    assert [r[1] for r in rows[1:]] == whole_labels
    assert (work / "d.csv").read_bytes() == before
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]


def test_predict_replaces_its_output_whole_and_keeps_it_on_a_bad_row(work, capsys):
    out = work / "p.csv"
    out.write_text("old predictions\n")
    bad = work / "bad.csv"
    lines = (work / "d.csv").read_text().splitlines()
    lines[60] = "1.0,oops,red,yes"
    bad.write_text("\n".join(lines) + "\n")
    code = main(["predict", "--model", str(work / "M"), "--csv", str(bad), "--out", str(out)])
    one_line_refusal(capsys, code, "bad.csv", "'b'", "line 61")
    assert out.read_text() == "old predictions\n"  # a failed predict leaves the old output
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]


def test_interrupt_is_one_line_exit_130_and_nothing_half_written(work, capsys, monkeypatch):
    from dreg_jax import saved_model

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(saved_model.TrainedModel, "predict_proba", interrupted)
    (work / "p.csv").write_text("old\n")
    code = main(["predict", "--model", str(work / "M"), "--csv", str(work / "d.csv"), "--out", str(work / "p.csv")])
    err = capsys.readouterr().err.strip()
    assert code == 130 and len(err.splitlines()) == 1 and "interrupted" in err
    assert (work / "p.csv").read_text() == "old\n"


def test_results_csv_is_written_whole(tmp_path, capsys):
    from dreg_jax.engine import EngineOptions, SweepConfig, run_sweep

    r = tmp_path / "r.jsonl"
    run_sweep(SweepConfig(datasets=("iris",), regularizers=("none",), seeds=1, epochs=1, hidden=(4,)).expand(), r,
              progress=False, options=EngineOptions(per_epoch_diagnostics=False))
    before = r.read_bytes()
    assert main(["results", str(r), "--csv", str(tmp_path / "flat.csv")]) == 0
    assert r.read_bytes() == before and "run_id" in (tmp_path / "flat.csv").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.csv", "r.jsonl", "r.jsonl.lock"]


def test_a_diverged_train_writes_its_row_and_saves_no_model(work, capsys):
    code = main(["train", "--csv", str(work / "d.csv"), "--target", "label", "--hidden", "8", "--epochs", "2",
                 "--strength", "1e30", "--out", str(work / "run.json"), "--save-model", str(work / "D")])
    out = capsys.readouterr().out
    assert code == 1
    record = json.loads((work / "run.json").read_text())
    assert record["status"] in ("diverged", "failed")
    assert "no model saved" in out and f"{record['status']} at step" in out
    assert not (work / "D").exists()


def test_tune_never_picks_or_saves_a_diverged_point(work, capsys):
    code = main(["tune", "--csv", str(work / "d.csv"), "--target", "label", "--regularizers", "dreg", "--hidden", "8",
                 "--epochs", "2", "--seeds", "1", "--learning-rates", "1e9", "--strengths", "1e-3", "1e-2",
                 "--max-extensions", "0", "--out", str(work / "T"), "--save-model", str(work / "S")])
    err = capsys.readouterr().err
    one_line = [line for line in err.splitlines() if line.startswith("dreg-jax:")]
    assert code == 2 and len(one_line) == 1 and "diverged" in one_line[0] and "learning rate 1e+09" in one_line[0]
    assert not (work / "S" / "dreg").exists()


def test_ctrl_c_during_tune_is_one_line_exit_130(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    with open(tmp_path / "digits.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"p{i}" for i in range(64)] + ["digit"])
        w.writerows([list(map(int, row)) + [int(label)] for row, label in zip(x, y)])
    proc = subprocess.Popen([sys.executable, "-c", "from dreg_jax.cli import console_main; console_main()", "tune",
                             "--csv", str(tmp_path / "digits.csv"), "--target", "digit", "--epochs", "300",
                             # one learning rate: Python handles the signal when the running compiled program returns,
                             # so each program stays as short as before on a loaded 2-core machine
                             "--learning-rates", "0.001", "--seeds", "3", "--out", str(tmp_path / "T")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            # a terminal's SIGINT: a suite started in the background (`make test &`)
                            # passes SIGINT ignored to its children, and the CLI keeps an ignored one
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.readline().decode()  # the table is read: tune is compiling or training now
    assert "train" in first, first
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.decode().strip().splitlines() if not line.startswith("dreg-jax: warning:")]
    assert proc.returncode == 130, err.decode()[-2000:]
    assert lines == ["dreg-jax: interrupted; every file is as it was or complete (nothing half written)"]
    assert not (tmp_path / "T").exists() or not any((tmp_path / "T").iterdir())


class _AlwaysTrainingBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.BatchNorm(use_running_average=False)(nn.Dense(8)(x)))


class _AlwaysDropout(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.Dropout(0.5, deterministic=False)(nn.Dense(8)(x)))


@pytest.mark.parametrize("module,layer", [(_AlwaysTrainingBatchNorm, "BatchNorm"), (_AlwaysDropout, "Dropout")])
def test_a_user_module_without_a_mode_argument_is_refused_by_name(module, layer):
    from dreg_jax.engine import RunHParams, train_many
    from dreg_jax.engine.run import EngineData

    rng = np.random.default_rng(0)
    data = EngineData(rng.normal(size=(32, 3)).astype(np.float32), rng.integers(0, 2, 32).astype(np.int32),
                      rng.normal(size=(8, 3)).astype(np.float32), rng.integers(0, 2, 8).astype(np.int32))
    config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(module=module(), activation="custom"), epochs=1,
                                  batch_size=16, regularizer=dreg_jax.RegularizerConfig(kind="none"))
    with pytest.raises(ValueError, match=f"your module's {layer} .* takes no train"):
        train_many(RunHParams.stack([RunHParams(seed=0, learning_rate=1e-3, strength=0.0)]), data, config, 2)


def test_a_second_train_into_a_directory_being_saved_stops_before_training(work, capsys):
    import warnings

    from dreg_jax import saved_model

    held, release = os.pipe(), os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JAX warns about fork; the child only holds a lock
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: another dreg-jax saving into work/D
        try:
            with saved_model.model_directory_lock(work / "D"):
                os.write(held[1], b"1")
                os.read(release[0], 1)
        finally:
            os._exit(0)
    assert os.read(held[0], 1) == b"1"
    code = main(["train", "--csv", str(work / "d.csv"), "--target", "label", "--save-model", str(work / "D")])
    os.write(release[1], b"1")
    os.waitpid(pid, 0)
    one_line_refusal(capsys, code, "another process is saving a model to", "/D")
    assert "training" not in capsys.readouterr().out and not (work / "D").exists()


def test_a_module_level_constant_is_part_of_the_run_id():
    import types

    from dreg_jax.engine.identity import model_identity

    source = ("import flax.linen as nn\nHIDDEN = {}\nclass Net(nn.Module):\n    @nn.compact\n"
              "    def __call__(self, x):\n        return nn.Dense(2)(nn.Dense(HIDDEN)(x))\n")
    ids = []
    for hidden in (1, 64, 1):
        module = types.ModuleType("user_net")
        exec(source.format(hidden), module.__dict__)  # noqa: S102 - a user's module, as a script defines it
        ids.append(model_identity(module.Net()))
    assert ids[0] != ids[1] and ids[0] == ids[2]


def test_an_interrupt_dropped_by_a_callback_is_delivered_again(capsys):
    """Python drops a KeyboardInterrupt raised inside a callback (JAX's garbage-collector hook
    did, and `tune` ran on after Ctrl-C): the CLI sends it again."""
    import gc
    import signal
    import time

    from dreg_jax.cli import interrupts_delivered

    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGINT)  # Python runs the handler here, inside the callback
            sum(range(10))

    # a terminal's SIGINT: a suite started in the background (`make test &`) inherits it ignored,
    # and interrupts_delivered leaves an ignored SIGINT alone
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with interrupts_delivered() as state:
            gc.callbacks.append(callback)
            try:
                for _ in range(100):  # a collection already running in another thread skips the callbacks
                    gc.collect()  # the interrupt is dropped inside the callback ...
                    if fired:
                        break
            finally:
                gc.callbacks.remove(callback)
            assert fired and state["pending"]
            with pytest.raises(KeyboardInterrupt):
                time.sleep(10)  # ... and delivered again
            state["pending"] = False
        assert "Exception ignored" not in capsys.readouterr().err
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def test_cli_help_lists_every_command_and_every_option_says_its_default(capsys):
    import argparse

    from dreg_jax.cli import build_parser, main

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = []

    def walk(p, name):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                text = action.help or ""
                if not text or (action.default not in (None, False) and "default" not in text):
                    missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(parser, "dreg-jax")
    assert not missing, f"options without help or without their default: {missing}"
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert all(f"\n  {name} " in top for name in commands), top  # every subcommand, in plain text
    assert "``" not in top and "::" not in top  # plain text, not raw RST
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("dreg-jax ")
