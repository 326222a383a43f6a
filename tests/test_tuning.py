"""Choosing the strength on validation: the pick is the argmax of mean validation accuracy
(ties to the smaller strength), test data never enters, an edge pick extends the grid."""
import dataclasses

import numpy as np
import pytest
from sklearn.datasets import load_iris

import dreg_jax
from dreg_jax.data import from_arrays
from dreg_jax.engine import dataset_engine_data
from dreg_jax.tuning import choose


def test_choose_is_the_argmax_of_the_mean_with_ties_to_the_smaller_strength():
    acc = {(1e-3, 1e-3): [0.8, 0.9], (1e-2, 1e-3): [0.85, 0.85], (1e-1, 1e-3): [0.9, 0.8], (1.0, 1e-3): [0.7, 0.7]}
    assert choose(acc) == (1e-3, 1e-3)  # three tie at 0.85: the smallest strength
    acc[(1e-2, 1e-3)] = [0.9, 0.9]
    assert choose(acc) == (1e-2, 1e-3)
    assert choose({(0.1, 3e-3): [0.5], (0.1, 1e-3): [0.5]}) == (0.1, 1e-3)  # then the smaller learning rate


@pytest.fixture(scope="module")
def iris():
    x, y = load_iris(return_X_y=True)
    ds = from_arrays(x, y, validation_fraction=0.3, seed=0)
    return ds


def test_tune_picks_the_best_validation_mean_and_never_reads_test_data(iris):
    config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(8,)), regularizer=dreg_jax.RegularizerConfig(kind="weight_decay"),
                                  optimizer=dreg_jax.OptimizerConfig(learning_rate=1e-2), epochs=3, batch_size=16)
    data = dataset_engine_data(iris)
    grid = (1e-4, 1e-2, 1.0, 100.0)
    result = dreg_jax.tune(data, config, 3, strengths=grid, seeds=2, max_extensions=0)
    means = {(r["strength"], r["learning_rate"]): r["mean"] for r in result.rows}
    best = max(sorted(means), key=lambda k: (means[k], -k[0]))
    assert (result.strength, result.learning_rate) == best
    assert [r["strength"] for r in result.rows] == list(grid) and all(r["seeds"] == 2 for r in result.rows)
    # poisoned test data: shuffled labels and garbage features change nothing
    rng = np.random.default_rng(0)
    poisoned = data._replace(y_test=rng.permutation(np.asarray(data.y_test)), x_test=100 + 0 * data.x_test)
    again = dreg_jax.tune(poisoned, config, 3, strengths=grid, seeds=2, max_extensions=0)
    assert again.rows == result.rows and again.strength == result.strength
    assert "| strength |" in result.table() and "(pick)" in result.table()


def test_an_edge_pick_extends_the_grid(iris):
    config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(8,)), regularizer=dreg_jax.RegularizerConfig(
                                      kind="weight_decay", weight_decay_reading="times_lr"),
                                  optimizer=dreg_jax.OptimizerConfig(learning_rate=1e-2), epochs=3, batch_size=16)
    data = dataset_engine_data(iris)
    # times_lr: a decay of 1e3 and 1e4 (x lr 1e-2) per step wipes the weights: the smallest
    # strength wins, on the edge
    result = dreg_jax.tune(data, config, 3, strengths=(1e2, 1e3, 1e4), seeds=2, max_extensions=1)
    strengths = [r["strength"] for r in result.rows]
    assert result.extensions == 1 and min(strengths) == pytest.approx(10.0)
    assert result.strength <= 1e2


def test_tune_refuses_data_without_validation_and_kinds_without_strength(iris):
    data = dataset_engine_data(iris)._replace(x_val=None, y_val=None)
    config = dreg_jax.TrainConfig(regularizer=dreg_jax.RegularizerConfig(kind="dreg"))
    with pytest.raises(ValueError, match="validation split"):
        dreg_jax.tune(data, config, 3, strengths=(1e-3, 1e-2))
    with pytest.raises(ValueError, match="'none' has no strength"):
        dreg_jax.strength_grid("none")


def _iris_dreg_runs(epochs: int, learning_rates):
    """Iris with a validation split, a DREG MLP config and 4 runs (2 seeds x the learning rates)."""
    import dreg_jax
    from dreg_jax.data import load_dataset
    from dreg_jax.engine import EngineData, RunHParams

    ds = load_dataset("iris", validation_fraction=0.3)
    data = EngineData(ds.x_train, ds.y_train, ds.x_test, ds.y_test, None, ds.x_val, ds.y_val)
    config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(8,)), epochs=epochs, batch_size=16,
                                  regularizer=dreg_jax.RegularizerConfig(kind="dreg"))
    runs = RunHParams.stack([RunHParams(seed=s, learning_rate=lr, strength=1e-3)
                             for s in range(2) for lr in learning_rates])
    return data, config, runs


def test_restore_best_epoch_keeps_the_best_validation_epoch():
    """Early stopping on validation: the final metrics are the best epoch's (the first epoch
    with the highest validation accuracy), read against the per-epoch curves of the same run."""
    from dreg_jax.engine import EngineOptions, train_many

    data, config, runs = _iris_dreg_runs(epochs=12, learning_rates=(3e-3, 3e-2))
    final, curves = train_many(runs, data, config, 3, EngineOptions(restore_best_epoch=True, vmap_width=4))
    for i in range(4):
        val = curves["validation_accuracy"][i]
        best = int(np.argmax(val))  # first maximum
        assert final["best_epoch"][i] == best + 1
        assert final["validation_accuracy"][i] == pytest.approx(val[best], abs=1e-6)
        assert final["test_accuracy"][i] == pytest.approx(curves["test_accuracy"][i][best], abs=1e-6)
    with pytest.raises(ValueError, match="validation"):
        train_many(runs, data._replace(x_val=None, y_val=None), config, 3, EngineOptions(restore_best_epoch=True))


@pytest.mark.parametrize("width", [pytest.param(1, marks=pytest.mark.slow), 4])  # 4: runs of one block stop apart
def test_patience_stops_each_run_after_its_last_improvement(width):
    """Early stopping with patience against the same runs trained to the cap without it: the
    curves agree up to each run's stop, the stop is ``patience`` epochs after the first best
    validation epoch (or the cap), and the kept epoch is the best one before the stop. A block
    of four runs stops each run on its own (the others keep training)."""
    from dreg_jax.engine import EngineOptions, train_many

    data, config, runs = _iris_dreg_runs(epochs=30, learning_rates=(1e-3, 3e-2))
    full, full_curves = train_many(runs, data, config, 3, EngineOptions(restore_best_epoch=True, vmap_width=width))
    patience = 3
    final, curves = train_many(runs, data, config, 3,
                               EngineOptions(restore_best_epoch=True, patience=patience, vmap_width=width))
    stops = []
    for i in range(4):
        val = full_curves["validation_accuracy"][i]
        # reference: the first epoch e with e - (first best epoch up to e) == patience
        best, stop = 0, len(val)
        for e in range(len(val)):
            if val[e] > val[best]:
                best = e
            if e - best >= patience:
                stop = e + 1
                break
        stops.append(stop)
        assert int(final["epochs_run"][i]) == stop
        assert final["best_epoch"][i] == best + 1
        np.testing.assert_allclose(curves["validation_accuracy"][i][:stop], val[:stop], atol=1e-6)
        assert np.isnan(curves["validation_accuracy"][i][stop:]).all()
        assert final["test_accuracy"][i] == pytest.approx(full_curves["test_accuracy"][i][best], abs=1e-6)
    assert min(stops) < config.epochs  # the check is not vacuous: at least one run stopped early
    with pytest.raises(ValueError, match="restore_best_epoch"):
        train_many(runs, data, config, 3, EngineOptions(patience=2))


def test_tune_a_regularizer_without_strength_chooses_the_learning_rate():
    import dreg_jax
    from dreg_jax.data import load_dataset

    ds = load_dataset("iris", validation_fraction=0.3)
    config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(8,)), epochs=3, batch_size=16)
    result = dreg_jax.tune(ds, config, learning_rates=[1e-4, 3e-2], seeds=2, keep_model=False)
    assert [r["strength"] for r in result.rows] == [0.0, 0.0] and result.extensions == 0
    means = {r["learning_rate"]: r["mean"] for r in result.rows}
    assert result.learning_rate == max(sorted(means), key=lambda lr: (means[lr], -lr))
    with pytest.raises(ValueError, match="no strength"):
        dreg_jax.tune(ds, config, strengths=[1e-3, 1e-2])


def test_paired_interval_covers_a_known_difference():
    """Synthetic held-out rows where the arm is right with probability 0.85 and the baseline with
    0.80 (independently per row and seed): the 95% interval covers the true +5 pp in about 95%
    of repetitions, and its point estimate is unbiased."""
    from dreg_jax.tuning import paired_interval

    rng = np.random.default_rng(0)
    covered, estimates = 0, []
    repetitions = 200
    for r in range(repetitions):
        y = rng.integers(0, 2, 300)
        arm, base = rng.random((3, 300)) < 0.85, rng.random((3, 300)) < 0.80
        diff, low, high = paired_interval(arm, base, y, 2, draws=400, seed=r)["accuracy"]
        covered += low <= 5.0 <= high
        estimates.append(diff)
    assert 0.89 <= covered / repetitions <= 0.99, covered
    assert abs(np.mean(estimates) - 5.0) < 0.5


def _table(path, x, y):
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"f{i}" for i in range(x.shape[1])] + ["label"])
        writer.writerows([list(map(float, row)) + [int(label)] for row, label in zip(x, y)])


def test_tune_cli_tunes_the_baseline_and_compares_on_held_out_rows_test_labels_never_move_picks(tmp_path, capsys):
    """The baseline (none) is tuned beside the asked regularizer; after the picks every arm is
    refit and scored on the held-out rows. Poisoned held-out (test) labels change the held-out
    scores but never the picks or the validation table."""
    import json

    from sklearn.datasets import load_breast_cancer

    from dreg_jax.cli import main

    x, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = order[:400], order[400:]
    _table(tmp_path / "train.csv", x[train], y[train])
    _table(tmp_path / "test.csv", x[test], y[test])
    _table(tmp_path / "poisoned.csv", x[test], rng.permutation(y[test]))
    runs = {}
    for name in ("test", "poisoned"):
        out = tmp_path / name
        assert main(["tune", "--csv", str(tmp_path / "train.csv"), "--test-csv", str(tmp_path / f"{name}.csv"),
                     "--target", "label", "--regularizers", "dreg", "--hidden", "8", "--epochs", "10", "--seeds", "2",
                     "--learning-rates", "0.01",
                     "--strengths", "1e-3", "1e-1", "--max-extensions", "0", "--validation-fraction", "0.25",
                     "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "[1/3] tuning none" in printed and "[2/3] tuning weight_decay" in printed and "[3/3] tuning dreg" in printed
        assert "held-out comparison (169 rows)" in printed and "vs none on your 169 held-out rows" in printed
        runs[name] = json.loads((out / "tune.json").read_text())
        assert (out / "held_out.png").stat().st_size > 0 and (out / "tune.png").stat().st_size > 0
    picks = lambda run: [(p["regularizer"], p["strength"], p["learning_rate"], p["rows"]) for p in run["picks"]]  # noqa: E731
    assert picks(runs["test"]) == picks(runs["poisoned"])  # test labels never reach the picks
    assert [p[0] for p in picks(runs["test"])] == ["none", "weight_decay", "dreg"]  # the baselines beside dreg
    clean, poisoned = (run["held_out"]["rows"][0]["accuracy"] for run in (runs["test"], runs["poisoned"]))
    assert clean > 0.85 and poisoned < 0.7  # the held-out rows are the test CSV's
    comparisons = runs["test"]["held_out"]["comparisons"]
    assert [c["regularizer"] for c in comparisons] == ["weight_decay", "dreg"]
    comparison = comparisons[1]
    low, high = comparison["accuracy_interval"]
    assert low <= comparison["accuracy_diff"] <= high and comparison["verdict"] in ("better", "worse", "no reliable difference")


def test_stratified_folds_are_disjoint_cover_every_row_and_keep_class_shares():
    from dreg_jax.tuning import stratified_folds

    y = np.repeat([0, 1, 2], [50, 30, 7])
    parts = stratified_folds(y, 5, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(y) and len(np.unique(joined)) == len(y)  # disjoint, every row once
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for c, n in enumerate([50, 30, 7]):
        per_fold = [int(np.sum(y[p] == c)) for p in parts]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == n
    with pytest.raises(ValueError, match="fewer rows than folds=10"):
        stratified_folds(y, 10)


def test_tune_by_k_fold_scores_every_row_once_per_seed(iris):
    config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(8,)), regularizer=dreg_jax.RegularizerConfig(kind="dreg"),
                                  optimizer=dreg_jax.OptimizerConfig(learning_rate=1e-2), epochs=2, batch_size=16)
    data = dataset_engine_data(iris)
    result = dreg_jax.tune(data, config, 3, strengths=(1e-3, 1e-1), seeds=2, folds=3, max_extensions=0)
    pooled = len(data.y_train) + (0 if data.x_val is None else len(data.y_val))
    assert result.validation_rows == pooled
    assert all(r["folds"] == 3 and r["seeds"] == 2 for r in result.rows)
    assert "3-fold cross-validation accuracy" in result.table()


def test_tune_cli_tunes_the_learning_rate_with_the_strength_by_default(tmp_path, capsys):
    """Without --learning-rates every strength is tried with 3e-4, 1e-3 and 3e-3; --no-baseline
    tunes the asked regularizer alone."""
    import json

    from sklearn.datasets import load_iris

    from dreg_jax.cli import TUNE_LEARNING_RATES, main

    x, y = load_iris(return_X_y=True)
    _table(tmp_path / "iris.csv", x, y)
    assert main(["tune", "--csv", str(tmp_path / "iris.csv"), "--target", "label", "--regularizers", "dreg",
                 "--no-baseline", "--hidden", "4", "--epochs", "1", "--seeds", "1", "--strengths", "1e-3", "1e-2",
                 "--max-extensions", "0", "--out", str(tmp_path / "out")]) == 0
    (pick,) = json.loads((tmp_path / "out" / "tune.json").read_text())["picks"]
    assert pick["regularizer"] == "dreg"
    assert sorted({row["learning_rate"] for row in pick["rows"]}) == sorted(TUNE_LEARNING_RATES)
    assert len(pick["rows"]) == 2 * len(TUNE_LEARNING_RATES)
    assert "held-out comparison" not in capsys.readouterr().out  # no baseline, no comparison


def test_held_out_comparison_scores_the_picks_own_runs_as_a_refit_would(iris):
    """tune keeps every seed's run at its pick; the held-out comparison scores those models, and
    they are the runs a refit trains again (same seeds, rows and hyperparameters): the scores
    agree up to float rounding between programs of different widths."""
    from dreg_jax.tuning import held_out_comparison

    config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(8,)), regularizer=dreg_jax.RegularizerConfig(kind="none"),
                                  optimizer=dreg_jax.OptimizerConfig(learning_rate=1e-2), epochs=3, batch_size=16)
    data = dataset_engine_data(iris)
    results = []
    for kind, strengths in (("none", None), ("dreg", (1e-3, 1e-1))):
        arm = dataclasses.replace(config, regularizer=dataclasses.replace(config.regularizer, kind=kind))
        results.append(dreg_jax.tune(data, arm, 3, strengths=strengths, seeds=2, max_extensions=0))
    assert all(sorted(r.pick_variables) == [0, 1] for r in results)
    kept = held_out_comparison(data, config, 3, results, seeds=2, draws=200)
    refit = held_out_comparison(data, config, 3, [dataclasses.replace(r, pick_variables=None) for r in results],
                                seeds=2, draws=200)
    one_row = 1.0 / len(data.y_test)
    for a, b in zip(kept.rows, refit.rows):
        assert a["regularizer"] == b["regularizer"] and abs(a["accuracy"] - b["accuracy"]) <= one_row
        assert abs(a["log_loss"] - b["log_loss"]) < 1e-3
    folded = dreg_jax.tune(data, config, 3, seeds=1, folds=2, max_extensions=0)
    assert folded.pick_variables is None  # K folds: no run trained on all the training rows
