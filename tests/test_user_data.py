"""Your own data: from_arrays / from_csv checks and splits, the CLI on a CSV, results as a table."""
import csv
import json

import flax.linen as nn
from flax import nnx
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_wine

import dreg_jax
from dreg_jax.cli import main as cli_main
from dreg_jax.data import from_arrays, from_csv
from dreg_jax.engine import EngineData, EngineOptions, RunHParams, RunSpec, SweepConfig, train_many


@pytest.fixture(scope="module")
def wine_csv(tmp_path_factory):
    x, y = load_wine(return_X_y=True)
    names = list(load_wine().feature_names)
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("csv") / "wine.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names + ["region", "cultivar"])
        for row, label in zip(x, y):
            writer.writerow([f"{v:.4g}" for v in row] + [rng.choice(["north", "south"]),
                                                          ["barolo", "grignolino", "barbera"][label]])
    return path


def test_from_arrays_splits_encodes_and_standardizes_with_training_stats():
    x, y = load_wine(return_X_y=True)
    labels = np.array(["a", "b", "c"])[y]
    ds = from_arrays(x, labels, validation_fraction=0.1, test_fraction=0.2, seed=3)
    assert ds.label_names == ("a", "b", "c") and ds.num_classes == 3
    assert len(ds.x_train) + len(ds.x_val) + len(ds.x_test) == len(x)
    for split in (ds.y_val, ds.y_test):  # stratified: every class in every split
        assert set(np.unique(split)) == {0, 1, 2}
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=0), 1, atol=1e-4)
    assert np.abs(ds.x_test.mean(axis=0)).max() > 1e-3  # test uses the training statistics
    again = from_arrays(x, labels, validation_fraction=0.1, test_fraction=0.2, seed=3)
    np.testing.assert_array_equal(again.x_test, ds.x_test)  # deterministic


def test_from_arrays_refuses_bad_input_with_the_place():
    x, y = load_wine(return_X_y=True)
    bad = x.copy()
    bad[17, 3] = np.nan
    with pytest.raises(ValueError, match=r"column 3 \('x3'\) row 17 is nan"):
        from_arrays(bad, y)
    shifted = from_arrays(x, y - 1)  # labels are categories: {-1, 0, 1} is three classes
    assert shifted.label_names == ("-1", "0", "1") and shifted.num_classes == 3
    with pytest.raises(ValueError, match=r"y_test has label\(s\) \[5\]"):
        from_arrays(x, y, x[:5], np.array([0, 1, 2, 5, 0]))
    with pytest.raises(ValueError, match="178 rows but y_train has 10"):
        from_arrays(x, y[:10])
    with pytest.warns(UserWarning, match=r"constant training column\(s\) \['x0'\]"):
        const = x.copy()
        const[:, 0] = 1.0
        from_arrays(const, y)


def test_from_csv_categorical_and_string_labels(wine_csv):
    ds = from_csv(wine_csv, "cultivar")
    assert ds.label_names == ("barbera", "barolo", "grignolino")
    assert ds.feature_names[-2:] == ("region=north", "region=south")
    assert ds.num_features == 15 and ds.name == "csv:wine.csv"
    with pytest.raises(ValueError, match="target column 'kind' is not in .*its columns: alcohol"):
        from_csv(wine_csv, "kind")


def test_csv_with_a_missing_cell_is_one_line_error(wine_csv, tmp_path, capsys):
    lines = wine_csv.read_text().splitlines()
    cells = lines[5].split(",")
    cells[2] = ""
    lines[5] = ",".join(cells)
    broken = tmp_path / "broken.csv"
    broken.write_text("\n".join(lines) + "\n")
    assert cli_main(["train", "--csv", str(broken), "--target", "cultivar", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "column 'ash' line 6 is missing" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_engine_refuses_nan_data_and_out_of_range_labels():
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    y = np.arange(20, dtype=np.int32) % 2
    config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(4,)), epochs=1, batch_size=8)
    hp = RunHParams.stack([RunHParams(0, 1e-3, 0.0, 1.0, 0.0, 0.0)])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="x_train has 1 NaN/inf value.*row 3, column 1"):
        train_many(hp, EngineData(jnp.asarray(bad), y, x, y), config, 2)
    with pytest.raises(ValueError, match=r"y_test labels must lie in \[0, 2\), got \[0, 2\]"):
        train_many(hp, EngineData(x, y, x, y + (y == 1)), config, 2)
    final, _ = train_many(hp, EngineData(x, y, x, y), config, 2)  # no dummy x_robust needed
    assert 0 <= final["test_accuracy"][0] <= 1


def test_csv_sweep_results_table_and_plots(wine_csv, tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    assert cli_main(["sweep", "--csv", str(wine_csv), "--target", "cultivar", "--regularizers", "none", "dreg",
                     "--seeds", "2", "--epochs", "3", "--hidden", "8", "--learning-rates", "1e-3", "1e-2",
                     "--no-epoch-diagnostics", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("dataset"))
    assert " lr " in header and "frac" not in header  # grouped by what differs (lr), not by what does not
    frame = dreg_jax.load_results(results)
    assert len(frame) == 8 and set(frame.learning_rate) == {1e-3, 1e-2}
    assert {"test_accuracy", "validation_accuracy", "regularizer", "strength", "seed",
            "jacobian_sq_norms_0", "robust_accuracy_per_set/gaussian_1"} <= set(frame.columns)
    assert all(isinstance(v, (int, float, str, bool, type(None))) or np.isscalar(v) for v in frame.iloc[0])
    table = tmp_path / "flat.csv"
    assert cli_main(["results", str(results), "--csv", str(table)]) == 0
    assert table.read_text().count("\n") == 9
    assert cli_main(["plot", str(results), "--out", str(tmp_path / "plots")]) == 0
    for png in ("accuracy_by_regularizer.png", "learning_curves.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 5000
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert all(0 <= r["metrics"]["validation_accuracy"] <= 1 for r in rows)


def toy_engine_data(seed):
    """64 rows of 16 features (4x4 images), label = sign of the first 8 features' sum; 48 train, 16 test."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    y = (x[:, :8].sum(1) > 0).astype(np.int32)
    return EngineData(jnp.asarray(x[:48]), jnp.asarray(y[:48]), jnp.asarray(x[48:]), jnp.asarray(y[48:]))


class TinyCNN(nn.Module):
    """A user CNN on flat rows of 4x4 images."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(-1, 4, 4, 1)
        x = nn.Sequential([nn.Conv(3, (3, 3)), dreg_jax.Activation(nn.gelu)], name="conv")(x)
        return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("scope", ["activation", pytest.param("layer", marks=pytest.mark.slow)])
def test_user_cnn_over_4_seeds_equals_4_separate_runs(scope):
    data = toy_engine_data(seed=0)
    config = dreg_jax.TrainConfig(
        model=dreg_jax.ModelConfig(module=TinyCNN(), activation="custom", jacobian_layers=("conv",)),
        regularizer=dreg_jax.RegularizerConfig(kind="dreg", dreg_scope=scope), epochs=2, batch_size=16)
    runs = RunHParams.stack([RunHParams(s, 1e-2, 0.01, 1.0, 0.0, 0.0) for s in range(4)])
    options = EngineOptions(per_epoch_diagnostics=False, vmap_width=4)
    together, curves = train_many(runs, data, config, 2, options)
    assert np.all(curves["penalty"] > 0)  # DREG acts on the user's module
    for seed in range(4):
        alone, _ = train_many(jax.tree_util.tree_map(lambda a: a[seed:seed + 1], runs), data, config, 2, options)
        for key, value in alone.items():
            np.testing.assert_array_equal(value[0], together[key][seed])


def test_user_module_config_errors():
    custom = dict(module=TinyCNN(), activation="custom")
    with pytest.raises(ValueError, match="needs ModelConfig.jacobian_layers"):
        dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(**custom),
                             regularizer=dreg_jax.RegularizerConfig(kind="dreg", dreg_scope="layer")).validate()
    with pytest.raises(ValueError, match="spectral_norm wraps the built-in MLP"):
        dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(**custom),
                             regularizer=dreg_jax.RegularizerConfig(kind="spectral_norm")).validate()
    with pytest.raises(ValueError, match="activation must be 'custom'"):
        dreg_jax.ModelConfig(module=TinyCNN()).validate()
    with pytest.raises(ValueError, match="can only be given from Python"):
        SweepConfig.from_mapping({"module": "TinyCNN"})
    specs = SweepConfig(datasets=("iris",), module=TinyCNN(), regularizers=("none",), seeds=1).expand()
    assert specs[0].config.model.activation == "custom"
    assert "TinyCNN" in specs[0].to_dict()["config"]["model"]["module"]
    assert RunSpec.from_dict(specs[0].to_dict()).run_id == specs[0].run_id


@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
def test_builtin_validation_split_is_carved_deterministically_and_recorded(tmp_path):
    from dreg_jax.data import load_dataset

    full = load_dataset("wine")
    ds = load_dataset("wine", validation_fraction=0.2)
    again = load_dataset("wine", validation_fraction=0.2)
    assert full.x_val is None  # 0 (the default) keeps the published splits
    assert len(ds.x_train) + len(ds.x_val) == len(full.x_train)
    np.testing.assert_array_equal(ds.x_val, again.x_val)
    assert set(np.unique(ds.y_val)) == set(np.unique(full.y_train))  # stratified
    train_rows = {r.tobytes() for r in ds.x_train}
    assert not any(r.tobytes() in train_rows for r in ds.x_val)
    specs = SweepConfig(datasets=("wine",), regularizers=("none",), seeds=2, epochs=2, hidden=(8,),
                        validation_fraction=0.2).expand()
    plain = SweepConfig(datasets=("wine",), regularizers=("none",), seeds=2, epochs=2, hidden=(8,)).expand()
    assert specs[0].run_id != plain[0].run_id and "validation_fraction" not in json.dumps(plain[0].run_id)
    from dreg_jax.engine import run_sweep
    records = run_sweep(specs, tmp_path / "r.jsonl", progress=False, options=EngineOptions(per_epoch_diagnostics=False))
    assert all(0 <= r["metrics"]["validation_accuracy"] <= 1 for r in records)


class NNXNet(nnx.Module):
    """A user NNX model on flat rows."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(16, 8, rngs=rngs)
        self.act = dreg_jax.NNXActivation(nnx.gelu)
        self.fc2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("scope", ["activation", pytest.param("layer", marks=pytest.mark.slow)])
def test_user_nnx_model_over_4_seeds_equals_4_separate_runs(scope):
    data = toy_engine_data(seed=1)
    config = dreg_jax.TrainConfig(
        model=dreg_jax.ModelConfig(module=dreg_jax.NNXModel(NNXNet), activation="custom", jacobian_layers=("fc1",)),
        regularizer=dreg_jax.RegularizerConfig(kind="dreg", dreg_scope=scope), epochs=6, batch_size=16)
    runs = RunHParams.stack([RunHParams(s, 1e-2, 0.01, 1.0, 0.0, 0.0) for s in range(4)])
    options = EngineOptions(vmap_width=4)
    together, curves = train_many(runs, data, config, 2, options)
    assert np.all(curves["penalty"] > 0) and together["jacobian_sq_norms"].shape == (4, 1)
    assert np.all(curves["train_loss"][:, -1] < curves["train_loss"][:, 0]) and np.all(np.isfinite(together["tau"]))
    assert len({float(a) for a in together["test_loss"]}) == 4  # seeds differ: per-run init
    for seed in range(4):
        alone, _ = train_many(jax.tree_util.tree_map(lambda a: a[seed:seed + 1], runs), data, config, 2, options)
        for key, value in alone.items():
            np.testing.assert_array_equal(value[0], together[key][seed])


def test_nnx_model_with_unknown_state_is_refused():
    class Counter(nnx.Variable):
        pass

    class WithCounter(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(16, 2, rngs=rngs)
            self.calls = Counter(jnp.zeros(()))

        def __call__(self, x):
            return self.fc(x)

    with pytest.raises(ValueError, match=r"keeps state other than nnx.Param, nnx.BatchStat and Rngs \(Counter\)"):
        dreg_jax.NNXModel(WithCounter).init(jax.random.key(0))
    assert repr(dreg_jax.NNXModel(NNXNet)) == "NNXModel(test_user_data.NNXNet)"


# ------------------------------------------------ BatchNorm and Dropout, train and eval modes
class LinenBNDrop(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(8, use_bias=False)(x)  # a bias before BatchNorm has a zero gradient: Adam amplifies its noise
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
        x = nn.Dropout(0.3, deterministic=not train)(nn.gelu(x))
        return nn.Dense(2)(x)


class NNXBNDrop(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(16, 8, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.8, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.fc2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(nnx.gelu(self.bn(self.fc1(x)))))


def _hand_written_steps(kind, steps, batch, lr):
    """A plain train-mode Adam loop (no engine): dropout masks from fold_in(step key, 1)."""
    import optax

    from dreg_jax.engine.run import run_keys
    from dreg_jax.training.user_model import dropout_key

    k_init = run_keys(0)[0]
    x, y = batch["x"], batch["y"]
    if kind == "linen":
        model = LinenBNDrop()
        variables = model.init(k_init, jnp.zeros((1, 16)), train=False)
        params, stats = variables["params"], variables["batch_stats"]

        def loss(p, stats, k):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                      rngs={"dropout": dropout_key(k)}, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

        def evaluate(p, stats):
            return model.apply({"params": p, "batch_stats": stats}, x, train=False)
    else:
        module = NNXBNDrop(nnx.Rngs(k_init))
        graphdef, params, stats, rng_state = nnx.split(module, nnx.Param, nnx.BatchStat, nnx.RngState)

        def bound(p, stats, k):
            counter = iter(range(len(jax.tree_util.tree_leaves(rng_state))))
            fresh = jax.tree_util.tree_map(
                lambda leaf: (jax.random.fold_in(k, next(counter)) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
                              else (next(counter), jnp.zeros_like(leaf))[1]), rng_state)
            copy = lambda tree: jax.tree_util.tree_map(lambda a: a, tree)  # Variables at this trace level
            return nnx.merge(graphdef, copy(p), copy(stats), fresh)

        def loss(p, stats, k):
            m = bound(p, stats, dropout_key(k))
            m.train()
            logits = m(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), nnx.state(m, nnx.BatchStat)

        def evaluate(p, stats):
            m = bound(p, stats, jax.random.key(0))
            m.eval()
            return m(x)
    tx = optax.adam(lr)
    opt = tx.init(params)
    keys = [jax.random.fold_in(jax.random.key(7), t) for t in range(steps)]
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    for k in keys:
        (_, stats), grads = grad(params, stats, k)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
    return params, stats, evaluate(params, stats), keys


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_batchnorm_and_dropout_train_like_a_hand_written_train_mode_loop(kind):
    from dreg_jax.training.train import create_train_state, eval_step, train_step

    module = LinenBNDrop() if kind == "linen" else dreg_jax.NNXModel(NNXBNDrop)
    config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(module=module, activation="custom"),
                                  regularizer=dreg_jax.RegularizerConfig(kind="none"),
                                  optimizer=dreg_jax.OptimizerConfig(learning_rate=1e-2), batch_size=12)
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(12, 16)), jnp.float32), "y": jnp.asarray(rng.integers(0, 2, 12))}
    from dreg_jax.engine.run import run_keys

    state = create_train_state(config, run_keys(0)[0], 16, 2)
    params, stats, eval_logits, keys = _hand_written_steps(kind, 3, batch, 1e-2)
    step = jax.jit(train_step, static_argnums=3)
    for k in keys:
        state, _ = step(state, batch, k, config)
    chex.assert_trees_all_close(state.params, params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state.batch_stats, stats, rtol=1e-5, atol=1e-6)
    assert jax.tree_util.tree_leaves(stats) and not all(  # statistics moved: training mode ran
        np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(stats),
                                          jax.tree_util.tree_leaves(create_train_state(config, run_keys(0)[0], 16, 2).batch_stats)))
    ev = eval_step(state, batch, config)  # inference mode: running statistics, no dropout
    expected = jnp.mean(jnp.argmax(eval_logits, -1) == batch["y"])
    np.testing.assert_allclose(ev["accuracy"], expected)


@pytest.mark.parametrize("kind", ["linen", pytest.param("nnx", marks=pytest.mark.slow)])
def test_dreg_on_a_batchnorm_dropout_module_through_the_engine(kind):
    module = LinenBNDrop() if kind == "linen" else dreg_jax.NNXModel(NNXBNDrop)
    layer = "Dense_1" if kind == "linen" else "fc2"
    config = dreg_jax.TrainConfig(
        model=dreg_jax.ModelConfig(module=module, activation="custom", jacobian_layers=(layer,)),
        regularizer=dreg_jax.RegularizerConfig(kind="dreg", dreg_scope="layer"), epochs=2, batch_size=16)
    runs = RunHParams.stack([RunHParams(s, 1e-2, 0.01, 1.0, 0.0, 0.0) for s in range(2)])
    final, curves = train_many(runs, toy_engine_data(seed=2), config, 2, EngineOptions(vmap_width=2))
    assert np.all(np.asarray(curves["penalty"]) > 0) and np.all(np.isfinite(np.asarray(final["test_loss"])))
