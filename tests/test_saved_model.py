"""Keeping a model: save/load round trips bit for bit, predictions on new CSV rows go through the
stored preprocessing (reordered and categorical columns), and every bad input is refused."""
import csv
import json
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

import dreg_jax
from dreg_jax.cli import main
from dreg_jax.data import from_arrays, from_csv
from dreg_jax.preprocessing import Preprocessing

from conftest import write_csv

HEADER = ["age", "color", "size", "id", "label"]
CONFIG = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(8,)), epochs=2, batch_size=32,
                              regularizer=dreg_jax.RegularizerConfig(kind="dreg"))


def table(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        age, size = rng.normal(40, 10), rng.normal()
        color = rng.choice(["red", "green", "blue"])
        label = "sick" if age / 10 + (color == "red") + size > 5 else "well"
        rows.append([f"{age:.3f}", color, f"{size:.4f}", f"p{seed}-{i}", label])
    return rows


write = write_csv


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    train = write(d / "train.csv", HEADER, table(240, 0))
    test_rows = table(60, 1)
    test = write(d / "test.csv", HEADER, test_rows)
    ds = from_csv(train, "label", test_csv=test, drop=["id"], validation_fraction=0.2)
    result = dreg_jax.tune(ds, CONFIG, strengths=[1e-3, 1e-2, 1e-1], seeds=2, max_extensions=0)
    return d, ds, result, test_rows


def test_preprocessing_rebuilds_the_training_arrays_bit_for_bit(files):
    d, ds, _, test_rows = files
    # the test file, columns reordered, the target and the dropped id still there
    order = [4, 2, 3, 0, 1]
    path = write(d / "reordered.csv", [HEADER[i] for i in order], [[r[i] for i in order] for r in test_rows])
    x, lines = ds.preprocessing.transform_csv(path)
    assert x.dtype == np.float32 and np.array_equal(x, ds.x_test)
    assert lines == list(range(2, 62))
    assert ds.preprocessing.feature_names == ds.feature_names
    assert [c.categories for c in ds.preprocessing.columns] == [None, ("blue", "green", "red"), None]
    assert Preprocessing.from_dict(json.loads(json.dumps(ds.preprocessing.to_dict()))) == ds.preprocessing


def test_saved_model_reloads_and_predicts_exactly(files, tmp_path):
    _, ds, result, _ = files
    model = result.model
    assert model.run["strength"] == result.strength and model.run["tuned"]
    model.save(tmp_path / "m")
    loaded = dreg_jax.load_model(tmp_path / "m")
    chex_equal = jax.tree_util.tree_map(np.array_equal, model.variables, loaded.variables)
    assert all(jax.tree_util.tree_leaves(chex_equal))
    assert np.array_equal(model.predict_proba(ds.x_test), loaded.predict_proba(ds.x_test))
    assert loaded.config.regularizer.strength == result.strength
    assert loaded.preprocessing == ds.preprocessing
    # the kept model is the pick's first-seed run: its validation accuracy is the one recorded
    val = np.mean(loaded.predict(ds.x_val) == ds.y_val)
    assert val == pytest.approx(model.run["validation_accuracy"], abs=1e-6)


def test_train_save_model_is_the_trained_run(files, tmp_path, capsys):
    d, _, _, _ = files
    rc = main(["train", "--csv", str(d / "train.csv"), "--target", "label", "--test-csv", str(d / "test.csv"),
               "--drop", "id", "--hidden", "8", "--epochs", "2", "--out", str(tmp_path / "run.json"),
               "--save-model", str(tmp_path / "m")])
    assert rc == 0
    run = json.loads((tmp_path / "run.json").read_text())
    model = dreg_jax.load_model(tmp_path / "m")
    ds = from_csv(d / "train.csv", "label", test_csv=d / "test.csv", drop=["id"])  # the CLI's split
    accuracy = np.mean(model.predict(ds.x_test) == ds.y_test)
    assert accuracy == pytest.approx(run["metrics"]["test_accuracy"], abs=1e-6)
    assert model.run["seed"] == 0 and model.config.model.activation == "gelu"


def test_predict_cli_on_reordered_categorical_rows(files, tmp_path, capsys):
    d, ds, result, test_rows = files
    result.model.save(tmp_path / "m")
    order = [2, 1, 0]  # size, color, age: no label, no id
    new = write(tmp_path / "new.csv", [HEADER[i] for i in order], [[r[i] for i in order] for r in test_rows[:7]])
    assert main(["predict", "--model", str(tmp_path / "m"), "--csv", str(new), "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    probabilities = result.model.predict_proba(ds.x_test[:7])
    assert [r["predicted"] for r in rows] == [ds.label_names[i] for i in probabilities.argmax(-1)]
    got = np.array([[float(r[f"probability_{n}"]) for n in ds.label_names] for r in rows])
    np.testing.assert_allclose(got, probabilities, rtol=1e-5)
    assert [int(r["line"]) for r in rows] == list(range(2, 9))


@pytest.mark.parametrize("header,row,message", [
    (["age", "color"], ["40", "red"], "lacks column(s) ['size']"),
    (["age", "color", "size", "weight"], ["40", "red", "0.1", "70"], "column(s) ['weight'] the model was not trained on"),
    (["age", "color", "size"], ["40", "purple", "0.1"], "column 'color' line 2 has category 'purple'"),
    (["age", "color", "size"], ["NA", "red", "0.1"], "column 'age' line 2 is 'NA', not a finite number"),
])
def test_predict_refuses_bad_rows_in_one_line(files, tmp_path, capsys, header, row, message):
    _, _, result, _ = files
    result.model.save(tmp_path / "m")
    new = write(tmp_path / "new.csv", header, [row])
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(tmp_path / "m"), "--csv", str(new), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_predict_never_overwrites_its_input(files, tmp_path, capsys):
    d, _, result, _ = files
    result.model.save(tmp_path / "m")
    before = (d / "test.csv").read_bytes()
    rc = main(["predict", "--model", str(tmp_path / "m"), "--csv", str(d / "test.csv"), "--out", str(d / "test.csv")])
    assert rc == 2 and (d / "test.csv").read_bytes() == before


def test_load_model_refusals(files, tmp_path):
    _, _, result, _ = files
    with pytest.raises(ValueError, match="is not a saved model"):
        dreg_jax.load_model(tmp_path)
    result.model.save(tmp_path / "m")
    record = json.loads((tmp_path / "m" / "model.json").read_text())
    (tmp_path / "m" / "model.json").write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        dreg_jax.load_model(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text(json.dumps({**record, "num_features": 3}))
    with pytest.raises(ValueError, match="num_features"):
        dreg_jax.load_model(tmp_path / "m")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        result.model.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


class Net(nn.Module):
    width: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.width)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(dreg_jax.Activation(nn.gelu)(x))


class OtherNet(Net):
    def __call__(self, x, train: bool = False):
        return super().__call__(2 * x, train)


def test_user_module_round_trip_and_identity_check(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    ds = from_arrays(x, (x[:, 0] > 0).astype(int), validation_fraction=0.2)
    config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(module=Net(), activation="custom"), epochs=2, batch_size=16,
                                  regularizer=dreg_jax.RegularizerConfig(kind="dreg"))
    fitted = dreg_jax.fit(config, ds.x_train, ds.y_train, ds.x_test, ds.y_test, progress=False)
    dreg_jax.save_model(tmp_path / "m", fitted.state, config, 2, 4, preprocessing=ds.preprocessing)
    with pytest.raises(ValueError, match="pass it"):
        dreg_jax.load_model(tmp_path / "m")
    with pytest.raises(ValueError, match="is not the saved one"):
        dreg_jax.load_model(tmp_path / "m", module=OtherNet())
    loaded = dreg_jax.load_model(tmp_path / "m", module=Net())
    assert loaded.variables["batch_stats"]  # running statistics kept
    reference = jax.jit(Net().apply)({"params": fitted.state.params, "batch_stats": fitted.state.batch_stats},
                                     ds.x_test)  # the trained variables, inference mode
    np.testing.assert_array_equal(loaded.logits(ds.x_test), np.asarray(reference))
    assert np.mean(loaded.predict(ds.x_test) == ds.y_test) == pytest.approx(float(fitted.test["accuracy"]), abs=1e-6)


def test_a_sweep_refuses_to_return_variables(tmp_path):
    from dreg_jax.engine import EngineOptions, RunSpec, run_sweep

    with pytest.raises(ValueError, match="records metrics, not parameters"):
        run_sweep([RunSpec("iris")], tmp_path / "r.jsonl", options=EngineOptions(return_variables=True))


def test_tune_a_user_module_and_keep_it(tmp_path):
    """``tune`` on your own linen module (DREG on its marked activation): the pick's model saves,
    reloads with the module and predicts what the in-memory model predicts."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(96, 4)).astype(np.float32)
    ds = from_arrays(x, (x[:, 0] + x[:, 1] > 0).astype(int), validation_fraction=0.25)
    config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(module=Net(), activation="custom"), epochs=2,
                                  batch_size=16, regularizer=dreg_jax.RegularizerConfig(kind="dreg"))
    result = dreg_jax.tune(ds, config, strengths=[1e-3, 1e-1], seeds=1, max_extensions=0)
    assert result.strength in (1e-3, 1e-1) and result.model.variables["batch_stats"]
    result.model.save(tmp_path / "m")
    loaded = dreg_jax.load_model(tmp_path / "m", module=Net())
    np.testing.assert_array_equal(loaded.predict_proba(ds.x_test), result.model.predict_proba(ds.x_test))
