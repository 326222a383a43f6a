"""The study v2 switches: weight decay per step, spectral norm without the head, DREG's
output-layer term, DREG arms per scope and sweep-wide regularizer options."""
import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dreg_jax import MLP
from dreg_jax.engine import RunSpec, SweepConfig
from dreg_jax.training.config import ModelConfig, OptimizerConfig, RegularizerConfig, TrainConfig
from dreg_jax.training.train import build_model, build_optimizer


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w": jax.random.normal(k1, (5, 3)), "b": jax.random.normal(k2, (3,))}


@pytest.mark.parametrize("reading", ["times_lr", "per_step", "normalized"])
def test_weight_decay_readings_against_the_update_rule(reading):
    lr, strength = 1e-3, 1e-2
    config = TrainConfig(regularizer=RegularizerConfig(kind="weight_decay", strength=strength,
                                                       weight_decay_reading=reading))
    params = _params()
    grads = jax.tree_util.tree_map(lambda p: 0.3 * p + 0.1, params)
    tx = build_optimizer(config, lr, strength, total_steps=100)
    updates, _ = tx.update(grads, tx.init(params), params)
    adam_updates, _ = optax.adam(lr).update(grads, optax.adam(lr).init(params), params)
    # Loshchilov & Hutter 2019 Alg. 2 (eta_t = 1): theta -= lr * adam + strength * theta;
    # optax/PyTorch: theta -= lr * adam + lr * strength * theta
    # normalized (L&H 2019): strength / sqrt(total steps)
    decay = {"per_step": strength, "times_lr": lr * strength, "normalized": strength / 10}[reading]
    expected = jax.tree_util.tree_map(lambda a, p: a - decay * p, adam_updates, params)
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-8)


def test_unknown_weight_decay_reading_and_normalized_without_steps():
    with pytest.raises(ValueError, match="weight_decay_reading"):
        RegularizerConfig(kind="weight_decay", weight_decay_reading="per_epoch").validate()
    config = TrainConfig(regularizer=RegularizerConfig(kind="weight_decay", weight_decay_reading="normalized"))
    with pytest.raises(ValueError, match="total_steps"):
        build_optimizer(config, 1e-3, 0.05)


def test_spectral_norm_without_the_head():
    x = jax.random.normal(jax.random.key(1), (4, 6))
    full = MLP(hidden=(8, 8), num_classes=3, spectral_norm=True)
    hidden_only = MLP(hidden=(8, 8), num_classes=3, spectral_norm=True, spectral_norm_head=False)
    v_full, v_hidden = full.init(jax.random.key(0), x), hidden_only.init(jax.random.key(0), x)
    assert "layer_instance" in v_full["params"]["head"]
    assert set(v_hidden["params"]["head"]) == {"kernel", "bias"}  # a plain Dense
    assert "layer_instance" in v_hidden["params"]["dense_0"]
    # the head applies W itself: scaling it scales the logits (free of sigma)
    scaled = jax.tree_util.tree_map(lambda a: a, v_hidden)
    scaled["params"]["head"] = {k: 10 * v for k, v in v_hidden["params"]["head"].items()}
    chex.assert_trees_all_close(hidden_only.apply(scaled, x), 10 * hidden_only.apply(v_hidden, x), rtol=1e-5)
    # built from the config switch
    config = TrainConfig(regularizer=RegularizerConfig(kind="spectral_norm", spectral_norm_head=False))
    assert build_model(config, 3).spectral_norm_head is False


@pytest.mark.parametrize("spectral_norm", [False, True])
@pytest.mark.parametrize("estimator", ["exact", "probe"])
def test_output_layer_term_matches_jacfwd(spectral_norm, estimator):
    x = jax.random.normal(jax.random.key(2), (5, 4))
    model = MLP(hidden=(6, 7), num_classes=3, activation="tanh", spectral_norm=spectral_norm)
    variables = model.init(jax.random.key(0), x)
    logits, sq = model.apply(variables, x, jax.random.key(3), jacobian_scope="layer", layer_estimator=estimator,
                             include_output=True, method=MLP.forward_with_jacobian_terms)
    _, sq_hidden = model.apply(variables, x, jax.random.key(3), jacobian_scope="layer", layer_estimator=estimator,
                               method=MLP.forward_with_jacobian_terms)
    assert sq.shape == (3,)
    chex.assert_trees_all_close(sq[:2], sq_hidden)

    # reference: the Jacobian of logits w.r.t. the last hidden representation, per example
    def head_of(h):
        return model.apply(variables, h[None], method=lambda m, h: m._affine(m.head, h, False))[0]

    _, _, h = model.apply(variables, x, jacobian_scope="activation", return_representation=True,
                          method=MLP.forward_with_jacobian_terms)
    reference = np.mean([np.sum(np.square(jax.jacfwd(head_of)(hi))) for hi in h])
    np.testing.assert_allclose(float(sq[2]), reference, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model.apply(variables, x)), rtol=1e-5, atol=1e-6)


def test_output_layer_switch_needs_the_layer_scope():
    with pytest.raises(ValueError, match="dreg_scope='layer'"):
        RegularizerConfig(kind="dreg", dreg_output_layer=True).validate()
    with pytest.raises(ValueError, match="jacobian_scope"):
        MLP(hidden=(4,), num_classes=2).apply(MLP(hidden=(4,), num_classes=2).init(jax.random.key(0), jnp.ones((1, 3))),
                                              jnp.ones((1, 3)), include_output=True,
                                              method=MLP.forward_with_jacobian_terms)


def test_output_layer_term_enters_the_dreg_loss():
    from dreg_jax.training.train import create_train_state, train_step

    x = jax.random.normal(jax.random.key(0), (16, 5))
    y = jnp.arange(16) % 3
    metrics = {}
    for flag in (False, True):
        config = TrainConfig(model=ModelConfig(hidden=(8, 8), activation="gelu"),
                             regularizer=RegularizerConfig(kind="dreg", strength=0.1, dreg_scope="layer",
                                                           layer_estimator="exact", dreg_output_layer=flag))
        state = create_train_state(config, jax.random.key(1), 5, 3)
        _, metrics[flag] = train_step(state, {"x": x, "y": y}, jax.random.key(2), config)
    head = np.asarray(state.params["head"]["kernel"])
    np.testing.assert_allclose(float(metrics[True]["penalty"] - metrics[False]["penalty"]),
                               0.1 * np.sum(head ** 2), rtol=1e-4)


def test_dreg_scope_list_gives_one_arm_per_scope_and_options_reach_every_run():
    sweep = SweepConfig(datasets=("wine",), activations=("gelu",), regularizers=("none", "weight_decay", "dreg"),
                        seeds=2, dreg_scope=("activation", "layer"),
                        regularizer_options={"layer_estimator": "exact", "weight_decay_reading": "per_step"})
    specs = sweep.expand()
    arms = sorted((s.config.regularizer.kind, s.config.regularizer.dreg_scope) for s in specs if s.seed == 0)
    assert arms == [("dreg", "activation"), ("dreg", "layer"), ("none", "activation"), ("weight_decay", "activation")]
    assert all(s.config.regularizer.weight_decay_reading == "per_step" for s in specs)
    assert len({s.run_id for s in specs}) == len(specs) == 8
    assert SweepConfig.from_mapping({"dreg_scope": ["activation", "layer"]}).dreg_scope == ("activation", "layer")


def test_regularizer_options_are_checked():
    with pytest.raises(ValueError, match="did you mean 'layer_estimator'"):
        SweepConfig(regularizer_options={"layer_estimater": "exact"}).expand()
    with pytest.raises(ValueError, match="cannot set 'kind'"):
        SweepConfig(regularizer_options={"kind": "dreg"}).expand()
    with pytest.raises(ValueError, match="regularizer_options must map"):
        SweepConfig.from_mapping({"regularizer_options": ["exact"]})
    with pytest.raises(ValueError, match="model_options has unknown field 'input_bound'"):
        SweepConfig(model_options={"input_bound": None}).expand()
    specs = SweepConfig(activations=("chainzrule",), model_options={"chainzrule_input_bound": None}).expand()
    assert all(s.config.model.chainzrule_input_bound is None for s in specs)


def test_new_fields_at_their_defaults_keep_earlier_run_ids():
    # run ids of results written before these fields existed are still found on resume
    # (weight_decay_reading's default is now per_step; a row without the field meant times_lr)
    spec = RunSpec("wine", TrainConfig(regularizer=RegularizerConfig(kind="weight_decay", weight_decay_reading="times_lr")))
    d = spec.to_dict()
    for name in ("weight_decay_reading", "spectral_norm_head", "dreg_output_layer"):
        del d["config"]["regularizer"][name]
    assert RunSpec.from_dict(d).run_id == spec.run_id
    changed = RunSpec("wine", TrainConfig(regularizer=RegularizerConfig(kind="weight_decay",
                                                                        weight_decay_reading="per_step")))
    assert changed.run_id != spec.run_id
    assert OptimizerConfig().learning_rate == 1e-3


def test_canonical_spec_of_a_row_written_before_later_fields_equals_todays():
    """A stored row's spec (no class_weight or task, weight_decay_reading written as times_lr, the
    default then) and today's spec of the same run compare equal once canonical; a weight-decay
    run's reading still tells them apart; the input is not changed."""
    from dreg_jax.engine.specs import canonical_spec

    today = RunSpec("wine", TrainConfig(regularizer=RegularizerConfig(kind="dreg"))).to_dict()
    assert today["config"]["regularizer"]["weight_decay_reading"] == "per_step"
    row = json.loads(json.dumps(today))
    for name in ("class_weight", "task"):
        del row["config"][name]
    row["config"]["regularizer"]["weight_decay_reading"] = "times_lr"
    before = json.dumps(row, sort_keys=True)
    assert canonical_spec(row) == canonical_spec(today)
    assert json.dumps(row, sort_keys=True) == before
    assert RunSpec.from_dict(row).run_id == RunSpec.from_dict(today).run_id
    decay_today = RunSpec("wine", TrainConfig(regularizer=RegularizerConfig(kind="weight_decay"))).to_dict()
    decay_row = json.loads(json.dumps(decay_today))
    decay_row["config"]["regularizer"]["weight_decay_reading"] = "times_lr"
    assert canonical_spec(decay_row) != canonical_spec(decay_today)


def test_weight_decay_acts_by_default_and_old_results_keep_their_reading():
    """The default reading is per_step (theta -= strength * theta every step); a stored config
    without the field (results and models written before the change) still means times_lr, and
    its run id is unchanged; the CLI flag selects a reading."""
    from dreg_jax.cli import _sweep_config, build_parser
    from dreg_jax.engine.specs import RunSpec
    from dreg_jax.training.regularizers import decay_per_step

    default = RegularizerConfig(kind="weight_decay")
    assert default.weight_decay_reading == "per_step"
    assert decay_per_step(default.weight_decay_reading, 1e-4, 1e-3) == pytest.approx(1e-4)  # not 1e-7
    old = TrainConfig(regularizer=RegularizerConfig(kind="weight_decay", weight_decay_reading="times_lr"))
    stored = dataclasses.asdict(old)
    del stored["regularizer"]["weight_decay_reading"]  # a row written before the field existed
    assert TrainConfig.from_dict(stored).regularizer.weight_decay_reading == "times_lr"
    old_spec = RunSpec("iris", old)
    assert RunSpec.from_dict(json.loads(json.dumps(old_spec.to_dict()))).run_id == old_spec.run_id
    assert RunSpec("iris", TrainConfig(regularizer=default)).run_id != old_spec.run_id  # never mixed on resume
    for flag, reading in (([], "per_step"), (["--weight-decay-reading", "times_lr"], "times_lr")):
        args = build_parser().parse_args(["sweep", "--datasets", "iris", "--regularizers", "weight_decay", *flag])
        specs = _sweep_config(args).expand()
        assert specs and all(s.config.regularizer.weight_decay_reading == reading for s in specs)


def test_balanced_class_weights_are_sklearns_and_weight_the_data_loss_as_documented():
    """w_c = n / (C n_c) over the included rows (sklearn's "balanced"); the data loss is
    sum_b w_b CE_b / sum_b w_b; metrics unweighted; run ids of class_weight="none" unchanged."""
    from sklearn.utils.class_weight import compute_class_weight

    from dreg_jax.cli import _sweep_config, build_parser
    from dreg_jax.training.regularizers import cross_entropy
    from dreg_jax.training.train import balanced_class_weights, create_train_state, train_step

    y = jnp.array([0, 0, 0, 0, 1, 1, 2, 0, 2, 1, 0, 0])
    included = jnp.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0])  # the last two rows are not trained on
    w = balanced_class_weights(y, included, 4)
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=np.asarray(y[:10]))
    np.testing.assert_allclose(np.asarray(w[:3]), expected, rtol=1e-6)
    assert float(w[3]) == 0.0  # a class without rows
    x = jax.random.normal(jax.random.key(0), (12, 5))
    for kind in ("none", "igpen", "dreg"):
        config = TrainConfig(model=ModelConfig(hidden=(8,)), regularizer=RegularizerConfig(kind=kind),
                             class_weight="balanced")
        state = create_train_state(config, jax.random.key(1), 5, 4)
        batch = {"x": x, "y": y, "w": w[y]}
        _, m = train_step(state, batch, jax.random.key(2), config)
        logits = state.apply_fn({"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}, x)
        ce = cross_entropy(logits, y)
        np.testing.assert_allclose(float(m["data_loss"]), float(jnp.sum(w[y] * ce) / jnp.sum(w[y])), rtol=1e-5)
        _, plain = train_step(state, {"x": x, "y": y}, jax.random.key(2), config)
        np.testing.assert_allclose(float(plain["data_loss"]), float(jnp.mean(ce)), rtol=1e-5)
    unweighted = RunSpec("iris", TrainConfig())
    assert RunSpec("iris", TrainConfig(class_weight="none")).run_id == unweighted.run_id
    assert RunSpec("iris", TrainConfig(class_weight="balanced")).run_id != unweighted.run_id
    with pytest.raises(ValueError, match="class_weight"):
        TrainConfig(class_weight="inverse").validate()
    args = build_parser().parse_args(["train", "--dataset", "iris", "--class-weight", "balanced"])
    args.datasets, args.regularizers = ["iris"], ["none"]
    assert all(s.config.class_weight == "balanced" for s in _sweep_config(args).expand())
