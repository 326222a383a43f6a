"""Train/eval steps for every regularizer: jit, vmap over seeds and strengths, bad configs."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dreg_jax
from dreg_jax.data import load_dataset

BATCH = {"x": jax.random.normal(jax.random.key(0), (16, 6)), "y": jnp.arange(16) % 3}


def config(kind="dreg", activation="chainzrule", **reg):
    return dreg_jax.TrainConfig(
        model=dreg_jax.ModelConfig(hidden=(8, 8), activation=activation),
        regularizer=dreg_jax.RegularizerConfig(kind=kind, **reg),
    )


@pytest.mark.parametrize("kind", dreg_jax.REGULARIZERS)
def test_every_regularizer_takes_a_finite_step(kind):
    cfg = config(kind)
    state = dreg_jax.create_train_state(cfg, jax.random.key(1), 6, 3)
    new_state, metrics = dreg_jax.train_step(state, BATCH, jax.random.key(2), cfg)
    assert np.isfinite(float(metrics["loss"]))
    assert int(new_state.step) == 1
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
    assert all(jax.tree_util.tree_leaves(changed))
    if kind in ("dreg", "igpen", "jacobian"):
        assert float(metrics["penalty"]) > 0
    ev = dreg_jax.eval_step(new_state, BATCH, cfg)
    assert ev["jacobian_sq_norms"].shape == (2,)


@pytest.mark.parametrize("scope,estimator", [("activation", "probe"), ("layer", "probe"), ("layer", "exact")])
def test_dreg_penalty_in_step_equals_library_formula(scope, estimator):
    cfg = config("dreg", dreg_scope=scope, layer_estimator=estimator)
    state = dreg_jax.create_train_state(cfg, jax.random.key(1), 6, 3)
    _, metrics = dreg_jax.train_step(state, BATCH, jax.random.key(3), cfg)
    expected = dreg_jax.dreg_penalty(metrics["jacobian_sq_norms"])  # default: raw sum
    np.testing.assert_allclose(metrics["penalty"], expected, rtol=1e-6)


@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
def test_vmap_over_seeds_and_strengths_equals_loop():
    cfg = config("dreg")
    seeds = jnp.arange(3)
    lams = jnp.array([0.0, 1e-2, 1e-1])

    def one(seed, strength):
        state = dreg_jax.create_train_state(cfg, jax.random.key(seed), 6, 3, strength=strength)
        for t in range(3):
            state, metrics = dreg_jax.train_step(state, BATCH, jax.random.fold_in(jax.random.key(seed), t), cfg)
        return state.params, metrics["loss"]

    batched = jax.jit(jax.vmap(one))(seeds, lams)
    for i in range(3):
        chex.assert_trees_all_close(
            jax.tree_util.tree_map(lambda a: a[i], batched), one(int(seeds[i]), lams[i]), rtol=1e-5, atol=1e-6
        )


def test_fit_learns_digits():
    ds = load_dataset("digits")
    cfg = dreg_jax.TrainConfig(
        model=dreg_jax.ModelConfig(hidden=(32,), activation="chainzrule"),
        regularizer=dreg_jax.RegularizerConfig(kind="dreg"), epochs=10, batch_size=64,
    )
    result = dreg_jax.fit(cfg, ds.x_train, ds.y_train, ds.x_test, ds.y_test, progress=False)
    assert result.test["accuracy"] > 0.85
    assert result.history["train_loss"][-1] < result.history["train_loss"][0]


def test_epoch_batches_cover_every_example():
    idx = np.asarray(dreg_jax.training.epoch_batch_indices(jax.random.key(0), 10, 4))
    assert idx.shape == (3, 4) and set(idx.ravel()) == set(range(10))


@pytest.mark.parametrize(
    "cfg,match",
    [
        (lambda: config("dropout"), "none, weight_decay, spectral_norm"),
        (lambda: config(activation="swish2"), "relu, gelu"),
        (lambda: config(dreg_scope="net"), "activation, layer"),
        (lambda: config(num_probes=0), "num_probes"),
        (lambda: config(layer_estimator="hutch"), "probe, exact"),
        (lambda: config(strength=-1.0), "strength"),
    ],
)
def test_invalid_configs_rejected_before_compiling(cfg, match):
    with pytest.raises(ValueError, match=match):
        dreg_jax.create_train_state(cfg(), jax.random.key(0), 6, 3)


def test_fit_rejects_bad_data():
    ds = load_dataset("iris")
    cfg = config("none")
    with pytest.raises(ValueError, match="NaN"):
        dreg_jax.fit(cfg, ds.x_train * np.nan, ds.y_train, ds.x_test, ds.y_test, progress=False)
    with pytest.raises(TypeError, match="integer class labels"):
        dreg_jax.fit(cfg, ds.x_train, ds.y_train.astype(float), ds.x_test, ds.y_test, progress=False)
    with pytest.raises(ValueError, match="features"):
        dreg_jax.fit(cfg, ds.x_train, ds.y_train, ds.x_test[:, :2], ds.y_test, progress=False)


def test_fit_works_on_a_training_set_smaller_than_half_a_batch():
    import dreg_jax
    from dreg_jax.training.fit import epoch_batch_indices

    idx = np.asarray(epoch_batch_indices(jax.random.key(0), 16, 64))
    assert idx.shape == (1, 64) and sorted(set(idx.ravel().tolist())) == list(range(16))
    assert np.array_equal(np.asarray(epoch_batch_indices(jax.random.key(0), 100, 64))[0, :64],
                          np.asarray(jax.random.permutation(jax.random.key(0), 100))[:64])
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    y = np.arange(16) % 2
    config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(4,)), epochs=2, batch_size=64)
    result = dreg_jax.fit(config, x, y, x, y, progress=False)
    assert len(result.history["train_loss"]) == 2 and np.isfinite(result.history["train_loss"]).all()
