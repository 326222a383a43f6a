"""Shape buckets and traced run lengths (issue 32): a padded run is the unpadded run to float
rounding, padding never enters a metric, and runs of different lengths share one program.

References: the same run on the data's own shapes (``shape_buckets="none"``, the engine's
layout before buckets) and each run compiled alone at its own epoch count.
"""
from __future__ import annotations

import dataclasses

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from dreg_jax.engine import EngineOptions, RunHParams, train_many
from dreg_jax.engine.buckets import Bucket, DataSizes, exact_bucket, ladder, pad_engine_data, padding_rules, prefix_draw
from dreg_jax.engine.grouping import plan_buckets
from dreg_jax.engine.run import EngineData
from dreg_jax.training.config import Fold, ModelConfig, RegularizerConfig, TrainConfig
from dreg_jax.training.train import create_train_state, eval_step

ROWS, TEST_ROWS, VAL_ROWS, FEATURES, CLASSES = 40, 19, 9, 5, 3
BUCKET = Bucket(64, 24, 12, 8, 6, 3)
OPTS = EngineOptions(restore_best_epoch=True, per_epoch_diagnostics=True, vmap_width=3)


def _data(seed=0):
    r = np.random.default_rng(seed)

    def split(rows):
        return r.normal(size=(rows, FEATURES)).astype(np.float32), r.integers(0, CLASSES, rows).astype(np.int32)

    (xt, yt), (xs, ys), (xv, yv) = split(ROWS), split(TEST_ROWS), split(VAL_ROWS)
    robust = np.stack([xs + 0.1, xs - 0.3]).astype(np.float32)
    return EngineData(*(jnp.asarray(a) for a in (xt, yt, xs, ys, robust, xv, yv)))


def _hparams(strength=0.01):
    # three runs: another seed, fraction, label and input noise and epoch count each
    return RunHParams.stack([RunHParams(seed=s, learning_rate=3e-3, strength=strength, data_fraction=f,
                                        label_noise=0.1, input_noise=0.05, epochs=e)
                             for s, f, e in [(0, 1.0, 3), (1, 0.5, 2), (2, 0.7, 3)]])


def _config(kind="none", fold=None, **reg):
    return TrainConfig(model=ModelConfig(hidden=(6, 5), activation="gelu"),
                       regularizer=RegularizerConfig(kind=kind, **reg), epochs=3, batch_size=16, fold=fold)


def _compare(config, bucket=BUCKET, hparams=None, atol=2e-5):
    data = _data()
    hparams = _hparams() if hparams is None else hparams
    own_final, own_curves = train_many(hparams, data, config, CLASSES, OPTS)
    padded = pad_engine_data(data, CLASSES, bucket)
    capped = dataclasses.replace(config, epochs=config.epochs + 2)  # a longer cap changes nothing
    final, curves = train_many(hparams, padded, capped, bucket.classes, OPTS)
    final = dict(final, robust_accuracy_per_set=final["robust_accuracy_per_set"][:, :2])
    chex.assert_trees_all_close(final, own_final, atol=atol, rtol=1e-5)
    for name, own in own_curves.items():
        mine = curves[name][:, :config.epochs]
        np.testing.assert_allclose(mine, own, atol=atol, rtol=1e-5, err_msg=name)
        assert np.all(np.isnan(curves[name][:, config.epochs:]) | (curves[name][:, config.epochs:] == -1)), name
    # the second run stopped after its own 2 epochs: NaN after
    assert np.isnan(curves["test_accuracy"][1, 2]) and not np.isnan(curves["test_accuracy"][0, 2])


def test_padded_folded_program_equals_the_unpadded_one():
    """none, weight decay, IGPen and DREG (activation scope) in one folded program."""
    kinds = ("none", "weight_decay", "igpen", "dreg")
    config = _config("none", fold=Fold((), kinds))
    hp = _hparams()._replace(regularizer_index=jnp.asarray([0, 1, 3], jnp.int32))
    _compare(config, hparams=hp)
    hp = _hparams()._replace(regularizer_index=jnp.asarray([2, 2, 3], jnp.int32))
    _compare(config, hparams=hp)


@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
@pytest.mark.parametrize("kind, reg, bucket", [
    ("spectral_norm", {}, BUCKET),
    ("spectral_norm", {"spectral_norm_head": False}, BUCKET),
    ("coherent", {}, BUCKET),
    ("dreg", {"dreg_scope": "layer", "layer_estimator": "exact", "dreg_output_layer": True}, BUCKET),
    ("dreg", {"dreg_scope": "layer", "layer_estimator": "probe"}, BUCKET._replace(features=FEATURES)),
    ("jacobian", {}, BUCKET._replace(classes=CLASSES)),
])
def test_padded_run_equals_the_unpadded_one(kind, reg, bucket):
    _compare(_config(kind, **reg), bucket)


@pytest.mark.slow
def test_padded_chainzrule_and_folded_activations_equal_the_unpadded_ones():
    config = dataclasses.replace(_config("dreg"), fold=Fold(("gelu", "chainzrule"), ()))
    _compare(config, hparams=_hparams()._replace(activation_index=jnp.asarray([1, 0, 1], jnp.int32)))


def test_runs_of_different_lengths_in_one_program_equal_each_run_compiled_alone():
    data = _data(1)
    hp = _hparams()
    config = _config("dreg")
    together, curves = train_many(hp, data, dataclasses.replace(config, epochs=4), CLASSES, OPTS)
    for i, epochs in enumerate(np.asarray(hp.epochs)):
        one = jax.tree_util.tree_map(lambda a: a[i:i + 1], hp)._replace(epochs=None)
        alone, alone_curves = train_many(one, data, dataclasses.replace(config, epochs=int(epochs)), CLASSES,
                                         dataclasses.replace(OPTS, vmap_width=1))
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[i], together),
                                    jax.tree_util.tree_map(lambda a: a[0], alone), atol=1e-5, rtol=1e-5)
        for name, c in alone_curves.items():
            np.testing.assert_allclose(curves[name][i, :epochs], c[0], atol=1e-5, rtol=1e-5, err_msg=name)


def test_an_epoch_count_above_the_programs_cap_is_refused():
    with pytest.raises(ValueError, match="epoch cap"):
        train_many(_hparams(), _data(), dataclasses.replace(_config(), epochs=2), CLASSES, OPTS)


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 30), features=st.integers(1, 7), classes=st.integers(2, 6),
       extra_rows=st.integers(0, 9), extra_features=st.integers(0, 4), extra_classes=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_padding_rows_and_classes_never_change_a_metric(rows, features, classes, extra_rows, extra_features,
                                                        extra_classes, seed):
    """eval_step on padded data (rows weighted out, -inf logits for padding classes, zero
    kernel rows for padding features) equals eval_step on the data's own shapes."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(rows, features)).astype(np.float32)
    y = r.integers(0, classes, rows).astype(np.int32)
    config = _config()
    key = jax.random.key(seed)
    state = create_train_state(config, key, features, classes)
    padded_state = create_train_state(config, key, features + extra_features, classes + extra_classes)
    p = jax.tree_util.tree_map(np.array, padded_state.params)
    own = jax.tree_util.tree_map(np.asarray, state.params)
    # the unpadded weights inside the padded layout, junk in the padding of hidden layers' inputs
    p["dense_0"]["kernel"][:] = 0.0
    p["dense_0"]["kernel"][:features] = own["dense_0"]["kernel"]
    p["dense_0"]["bias"][:] = own["dense_0"]["bias"]
    p["dense_1"] = own["dense_1"]
    p["head"]["kernel"][:] = r.normal(size=p["head"]["kernel"].shape)  # padding classes: any value
    p["head"]["kernel"][:, :classes] = own["head"]["kernel"]
    p["head"]["bias"][:] = 50.0
    p["head"]["bias"][:classes] = own["head"]["bias"]
    padded_state = padded_state.replace(params=p, num_classes=jnp.int32(classes))
    xp = np.zeros((rows + extra_rows, features + extra_features), np.float32)
    xp[:rows, :features] = x
    xp[rows:] = r.normal(size=(extra_rows, features + extra_features))  # padding rows: any value
    yp = np.concatenate([y, r.integers(0, classes + extra_classes, extra_rows)]).astype(np.int32)
    want = eval_step(state, {"x": x, "y": y}, config)
    got = eval_step(padded_state, {"x": xp, "y": yp, "rows": jnp.int32(rows)}, config)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 2, 6)])
@pytest.mark.parametrize("draw", [jax.random.normal, jax.random.uniform,
                                  lambda k, s: jax.random.rademacher(k, s, jnp.float32)])
def test_prefix_draw_is_the_true_shapes_draw_zero_padded(shape, draw):
    key = jax.random.key(3)
    true_width = shape[-1]
    padded = shape[:-1] + (true_width + 3,)
    got = prefix_draw(draw, key, padded, jnp.int32(true_width))
    np.testing.assert_array_equal(got[..., :true_width], draw(key, shape))
    assert np.all(np.asarray(got[..., true_width:]) == 0)


def test_padded_data_keep_the_values_and_say_their_sizes():
    data = _data()
    padded = pad_engine_data(data, CLASSES, BUCKET)
    assert padded.x_train.shape == (64, 8) and padded.x_robust.shape == (3, 24, 8)
    np.testing.assert_array_equal(padded.x_train[:ROWS, :FEATURES], data.x_train)
    assert not np.any(padded.x_train[ROWS:]) and not np.any(padded.x_train[:, FEATURES:])
    assert tuple(int(v) for v in padded.sizes) == (ROWS, TEST_ROWS, VAL_ROWS, FEATURES, CLASSES, 2)
    assert exact_bucket(data, CLASSES) == Bucket(ROWS, TEST_ROWS, VAL_ROWS, FEATURES, CLASSES, 2)
    with pytest.raises(ValueError, match="smaller than the data"):
        pad_engine_data(data, CLASSES, BUCKET._replace(features=4))
    with pytest.raises(ValueError, match="validation split"):
        pad_engine_data(data, CLASSES, BUCKET._replace(val_rows=0))
    assert isinstance(padded.sizes, DataSizes)


def test_ladder_pads_at_most_half():
    assert [ladder(v) for v in (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 100)] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 128]
    assert all(v <= ladder(v) <= 1.5 * v for v in range(1, 2000))


def test_padding_rules_keep_exact_what_draws_or_counts_over_an_axis():
    assert padding_rules(_config("dreg")) == (True, True, True)
    assert padding_rules(_config("jacobian")) == (True, True, False)
    assert padding_rules(_config("dreg", dreg_scope="layer", layer_estimator="probe")) == (True, False, True)
    assert padding_rules(_config("dreg", strength_schedule="noise_inverse")) == (True, False, False)
    assert padding_rules(_config("none"), return_variables=True) == (False, False, False)


def test_plan_buckets_modes_and_cost_model():
    config = _config()
    shapes = {"a": Bucket(100, 30, 20, 8, 2, 0), "b": Bucket(120, 40, 30, 13, 3, 0),
              "c": Bucket(90, 30, 20, 8, 2, 2)}  # c has robust sets: never with a or b
    small = {s: (50, 5, 500) for s in shapes}
    rules = (True, True, True)
    assert plan_buckets(config, shapes, small, rules, "none") == [(None, ("a",)), (None, ("b",)), (None, ("c",))]
    auto = plan_buckets(config, shapes, small, rules, "auto", backend="cpu")
    assert (Bucket(120, 40, 30, 13, 3, 0), ("a", "b")) in auto and (None, ("c",)) in auto
    assert plan_buckets(config, shapes, small, rules, "all") == auto
    # a heavy workload: padding 8 -> 400 features costs more than a compilation
    wide = dict(shapes, b=Bucket(120, 40, 30, 400, 3, 0))
    heavy = {s: (10**6, 10**4, 10**6) for s in shapes}
    wide_model = dataclasses.replace(config, model=ModelConfig(hidden=(256, 256)), batch_size=256)
    assert (None, ("a",)) in plan_buckets(wide_model, wide, heavy, rules, "auto", backend="cpu")
    assert len(plan_buckets(config, wide, small, rules, "auto", backend="cpu")) == 2  # light work: merged
    # features may not be padded: only equal feature counts share
    assert (None, ("b",)) in plan_buckets(config, shapes, small, (True, False, True), "all")
    with pytest.raises(ValueError, match="shape_buckets must be one of"):
        plan_buckets(config, shapes, small, rules, "some")


@pytest.mark.parametrize("rows", [1, 255, 256, 269, 300])
def test_chunked_evaluation_of_a_perfect_model_is_exactly_one(rows):
    """Accuracies are counts over the real rows divided once: never 1.0000004 (a row the
    results store would refuse), whatever the chunking (chunks of 256, the last one clamped)."""
    from dreg_jax.engine.run import evaluate_rows

    config = _config()
    state = create_train_state(config, jax.random.key(0), FEATURES, CLASSES)
    x = np.random.default_rng(rows).normal(size=(300, FEATURES)).astype(np.float32)
    y = np.asarray(jnp.argmax(state.apply_fn({"params": state.params}, x), -1)).astype(np.int32)
    y[rows:] = (y[rows:] + 1) % CLASSES  # padding rows are all wrong: they must not count
    got = jax.jit(lambda s: evaluate_rows(s, x, y, jnp.int32(rows), config))(state)
    assert float(got["accuracy"]) == 1.0
    want = eval_step(state, {"x": x[:rows], "y": y[:rows]}, config)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["jacobian_sq_norms"], want["jacobian_sq_norms"], rtol=1e-5)
    assert float(eval_step(state, {"x": x, "y": y, "rows": jnp.int32(rows)}, config)["accuracy"]) == 1.0
