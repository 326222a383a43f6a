"""Engine: vmapped grids equal one-by-one runs, sharding equals unsharded, failures, determinism."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dreg_jax
from dreg_jax.engine.scarcity import stratified_fraction_mask, symmetric_label_noise
from dreg_jax.engine import EngineOptions, RunHParams, gradient_tail_ratio, train_many
from dreg_jax.engine.sweep import engine_data

CFG = dreg_jax.TrainConfig(
    model=dreg_jax.ModelConfig(hidden=(16, 16), activation="chainzrule"),
    regularizer=dreg_jax.RegularizerConfig(kind="dreg"), epochs=3, batch_size=32,
)
OPTS = EngineOptions(diag_size=32)


def hp(seed, lr=1e-3, strength=10**-2.5, fraction=1.0, label_noise=0.0, input_noise=0.0):
    return RunHParams(seed, lr, strength, fraction, label_noise, input_noise)


@pytest.fixture(scope="module")
def wine():
    return engine_data("wine")


def test_vmapped_grid_equals_runs_one_by_one(wine):
    data, classes = wine
    rows = [hp(0), hp(1, fraction=0.5), hp(2, lr=3e-3, strength=1e-2, label_noise=0.2)]
    final, curves = train_many(RunHParams.stack(rows), data, CFG, classes, OPTS)
    for i, row in enumerate(rows):
        f1, c1 = train_many(RunHParams.stack([row]), data, CFG, classes, OPTS)
        chex.assert_trees_all_close(
            jax.tree_util.tree_map(lambda a: a[i], (final, curves)),
            jax.tree_util.tree_map(lambda a: a[0], (f1, c1)), rtol=1e-4, atol=1e-5,
        )
    half = int(np.maximum(1, np.round(0.5 * np.bincount(np.asarray(data.y_train)))).sum())
    assert final["train_examples"].tolist() == [133, half, 133]  # stratified half
    assert curves["test_accuracy"].shape == (3, CFG.epochs)
    assert (final["fail_step"] == -1).all()


@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
def test_step_tail_ratio_wiring(wine):
    data, classes = wine
    final, curves = train_many(RunHParams.stack([hp(0), hp(1)]), data, CFG, classes, OPTS)
    assert np.all(curves["tau_steps"] >= 1.0) and np.all(np.isfinite(curves["tau_steps"]))
    np.testing.assert_array_equal(final["tau_steps"], curves["tau_steps"][:, -1])
    one_step = dataclasses.replace(CFG, batch_size=len(data.x_train))  # one step per epoch: p99 = mean
    final, curves = train_many(RunHParams.stack([hp(0)]), data, one_step, classes, OPTS)
    np.testing.assert_allclose(curves["tau_steps"], 1.0, rtol=1e-6)


def test_same_seed_twice_is_identical(wine):
    data, classes = wine
    a = train_many(RunHParams.stack([hp(7)]), data, CFG, classes, OPTS)
    b = train_many(RunHParams.stack([hp(7)]), data, CFG, classes, OPTS)
    chex.assert_trees_all_equal(a, b)
    c = train_many(RunHParams.stack([hp(8)]), data, CFG, classes, OPTS)
    assert not np.allclose(a[1]["train_loss"], c[1]["train_loss"])


def test_diverging_run_is_marked_failed_and_others_finish(wine):
    data, classes = wine
    cfg = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(16,), activation="relu"),
                               regularizer=dreg_jax.RegularizerConfig(kind="none"), epochs=3, batch_size=32)
    final, _ = train_many(RunHParams.stack([hp(0), hp(0, input_noise=1e38)]), data, cfg, classes, OPTS)
    assert final["fail_step"][0] == -1 and np.isfinite(final["test_loss"][0])
    assert final["fail_step"][1] == 0  # inf inputs: the very first step is non-finite


def test_stratified_masks_are_nested_stratified_and_deterministic():
    labels = jnp.asarray(np.repeat(np.arange(3), [50, 30, 20]))
    key = jax.random.key(3)
    masks = {f: np.asarray(stratified_fraction_mask(key, labels, f, 3)) for f in (0.05, 0.1, 0.25, 0.5, 1.0)}
    for f, m in masks.items():
        counts = np.bincount(np.asarray(labels)[m], minlength=3)
        np.testing.assert_array_equal(counts, np.maximum(1, np.round(f * np.array([50, 30, 20]))))
    fs = sorted(masks)
    for small, big in zip(fs, fs[1:]):
        assert not (masks[small] & ~masks[big]).any()  # nested
    np.testing.assert_array_equal(masks[0.25], stratified_fraction_mask(key, labels, 0.25, 3))
    other = stratified_fraction_mask(jax.random.key(4), labels, 0.25, 3)
    assert (np.asarray(other) != masks[0.25]).any()


def test_label_noise_rate_and_never_same_label():
    labels = jnp.asarray(np.arange(20000) % 5)
    noisy = symmetric_label_noise(jax.random.key(0), labels, 0.3, 5)
    flipped = np.asarray(noisy != labels)
    assert abs(flipped.mean() - 0.3) < 0.015
    assert np.asarray(noisy).min() >= 0 and np.asarray(noisy).max() < 5


def test_tail_ratio_closed_form():
    norms = jnp.concatenate([jnp.ones(99), jnp.array([101.0])])
    # p99 (linear interpolation at rank 98.01) = 1 + 0.01 * 100 = 2; mean = 2
    np.testing.assert_allclose(dreg_jax.engine.tail_ratio(norms), 1.0, rtol=1e-3)
    np.testing.assert_allclose(dreg_jax.engine.tail_ratio(jnp.full(10, 3.0)), 1.0, rtol=1e-6)


@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
def test_per_example_grad_norms_match_loop():
    state = dreg_jax.create_train_state(CFG, jax.random.key(0), 5, 3)
    x = jax.random.normal(jax.random.key(1), (6, 5))
    y = jnp.arange(6) % 3
    from dreg_jax.engine import per_example_grad_norms
    import optax
    norms = per_example_grad_norms(state, x, y)
    for i in range(6):
        g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            state.apply_fn({"params": p}, x[i:i + 1]), y[i:i + 1])[0])(state.params)
        np.testing.assert_allclose(norms[i], optax.tree.norm(g), rtol=1e-5)
    np.testing.assert_allclose(gradient_tail_ratio(state, x, y),
                               np.percentile(np.asarray(norms), 99) / np.mean(np.asarray(norms)), rtol=1e-5)
    with pytest.raises(ValueError, match="param, input"):
        per_example_grad_norms(state, x, y, variant="output")


SHARDED = textwrap.dedent("""
    import json, os
    import jax, numpy as np
    import dreg_jax
    from dreg_jax.engine import EngineOptions, RunHParams, run_mesh, train_many
    from dreg_jax.engine.grid import block_width, place, run_blocks
    from dreg_jax.engine.sweep import engine_data
    from dreg_jax.training.config import Fold
    assert len(jax.devices()) == 8, jax.devices()
    data, classes = engine_data("wine")
    # a folded program (2 activations x 2 regularizers), as the study's sweeps compile them
    cfg = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(16,), activation="gelu"),
                               regularizer=dreg_jax.RegularizerConfig(kind="none"), epochs=2, batch_size=32,
                               fold=Fold(("gelu", "tanh"), ("none", "dreg")))
    hps = RunHParams.stack([RunHParams(s, 1e-3, 3e-3, 1.0, 0.0, 0.0, s % 2, s // 2 % 2) for s in range(5)])
    opts = EngineOptions(diag_size=16, vmap_width=8)
    mesh = run_mesh()
    block, _ = place(run_blocks(hps, block_width(opts, mesh))[0], data, mesh)
    plain = train_many(hps, data, cfg, classes, opts)
    sharded = train_many(hps, data, cfg, classes, opts, mesh=mesh)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), plain, sharded)
    print(json.dumps({"max_diff": max(jax.tree_util.tree_leaves(diffs)),
                      "runs": int(sharded[0]["test_accuracy"].shape[0]),
                      "devices": len(block.seed.sharding.device_set),
                      "per_device": [s.data.shape[0] for s in block.seed.addressable_shards]}))
""")


@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
def test_sharded_over_8_cpu_devices_equals_unsharded():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["runs"] == 5  # 5 runs padded to 8 devices, padding dropped
    assert result["devices"] == 8 and result["per_device"] == [1] * 8  # the run axis is split
    assert result["max_diff"] < 1e-4


@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
def test_compiled_program_cache_is_bounded(wine, monkeypatch):
    from dreg_jax.engine import grid

    monkeypatch.setattr(grid, "MAX_CACHED_EXECUTABLES", 2)
    data, classes = wine
    for width in (3, 4, 5):
        cfg = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(width,), activation="tanh"),
                                   regularizer=dreg_jax.RegularizerConfig(kind="none"), epochs=1, batch_size=64)
        train_many(RunHParams.stack([hp(0)]), data, cfg, classes, OPTS)
        assert len(grid._EXECUTABLES) <= 2
