"""Lambda schedules: multipliers against their formulas, the noise ratio against a numpy loop,
the schedules inside train_step and the engine, config errors, stable run ids."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dreg_jax
from dreg_jax.engine import EngineOptions, RunHParams, train_many
from dreg_jax.engine.sweep import RunSpec, SweepConfig, engine_data


def noise_ratio_reference(h, y):
    """Within-class over between-class scatter per example, by explicit loops."""
    h, y = np.asarray(h, np.float64), np.asarray(y)
    grand = h.mean(0)
    noise = signal = 0.0
    for k in np.unique(y):
        members = h[y == k]
        c = members.mean(0)
        noise += sum(float(np.sum((row - c) ** 2)) for row in members)
        signal += len(members) * float(np.sum((c - grand) ** 2))
    return noise / signal


@pytest.mark.parametrize("batch,features,classes", [(12, 3, 3), (40, 7, 5), (9, 1, 4)])
@pytest.mark.parametrize("jit", [False, True])
def test_noise_ratio_matches_loop_reference(batch, features, classes, jit):
    kh, ky = jax.random.split(jax.random.key(batch))
    y = jax.random.randint(ky, (batch,), 0, classes - 1)  # the last class is absent
    h = jax.random.normal(kh, (batch, features)) + 2.0 * y[:, None]
    fn = jax.jit(dreg_jax.representation_noise_ratio, static_argnums=2) if jit else dreg_jax.representation_noise_ratio
    np.testing.assert_allclose(float(fn(h, y, classes)), noise_ratio_reference(h, y), rtol=1e-5)


def test_noise_ratio_closed_forms():
    y = jnp.array([0, 0, 1, 1])
    # points exactly at their class means: no noise
    assert float(dreg_jax.representation_noise_ratio(jnp.array([[1.0], [1.0], [-1.0], [-1.0]]), y, 2)) == 0.0
    # class means +-1, within-class offsets +-0.5: N = 0.25, S = 1, ratio 0.25, multiplier 0.8
    h = jnp.array([[1.5], [0.5], [-0.5], [-1.5]])
    ratio = dreg_jax.representation_noise_ratio(h, y, 2)
    np.testing.assert_allclose(float(ratio), 0.25, rtol=1e-6)
    m = dreg_jax.strength_multiplier("noise_inverse", 0, 1, noise_ratio=ratio)
    np.testing.assert_allclose(float(m), 0.8, rtol=1e-6)
    with pytest.raises(ValueError, match="batch, features"):
        dreg_jax.representation_noise_ratio(jnp.ones((4,)), y, 2)


@pytest.mark.parametrize("total", [1, 10, 137])
def test_multipliers_match_formulas(total):
    for t in range(total + 2):
        for w in (0.1, 0.25, 1.0):
            got = float(dreg_jax.strength_multiplier("linear_warmup", t, total, warmup_fraction=w))
            np.testing.assert_allclose(got, min(1.0, (t + 1) / max(w * total, 1.0)), rtol=1e-6)
        got = float(dreg_jax.strength_multiplier("cosine_decay", t, total))
        np.testing.assert_allclose(got, 0.5 * (1 + math.cos(math.pi * min(t / total, 1.0))), rtol=1e-5, atol=1e-6)
        assert float(dreg_jax.strength_multiplier("constant", t, total)) == 1.0
    jitted = jax.jit(lambda t: dreg_jax.strength_multiplier("cosine_decay", t, total))
    np.testing.assert_allclose(float(jitted(total // 2)), float(dreg_jax.strength_multiplier("cosine_decay", total // 2, total)))


def test_multiplier_errors_name_the_fix():
    with pytest.raises(ValueError, match="expected one of: constant, linear_warmup"):
        dreg_jax.strength_multiplier("exponential", 0, 10)
    with pytest.raises(ValueError, match="needs noise_ratio"):
        dreg_jax.strength_multiplier("noise_inverse", 0, 10)
    with pytest.raises(ValueError, match="warmup_fraction"):
        dreg_jax.strength_multiplier("linear_warmup", 0, 10, warmup_fraction=0.0)


def config(schedule="constant", kind="dreg", **reg):
    return dreg_jax.TrainConfig(
        model=dreg_jax.ModelConfig(hidden=(8, 8), activation="chainzrule"),
        regularizer=dreg_jax.RegularizerConfig(kind=kind, strength_schedule=schedule, **reg),
        epochs=2, batch_size=16,
    )


BATCH = {"x": jax.random.normal(jax.random.key(0), (16, 6)), "y": jnp.arange(16) % 3}


@pytest.mark.parametrize("schedule", dreg_jax.SCHEDULES)
def test_step_penalty_is_lambda0_times_multiplier(schedule):
    cfg = config(schedule)
    state = dreg_jax.create_train_state(cfg, jax.random.key(1), 6, 3, total_steps=8)
    for t in range(4):
        new_state, m = dreg_jax.train_step(state, BATCH, jax.random.key(t), cfg)
        raw = dreg_jax.dreg_penalty(m["jacobian_sq_norms"], strength=1.0)
        if schedule == "noise_inverse":
            # recompute the penultimate representation independently with the plain layers
            h = BATCH["x"]
            for i in range(2):
                h = state.apply_fn({"params": state.params}, h, i, method=dreg_jax.MLP.hidden_layer)
            ratio = noise_ratio_reference(h, BATCH["y"])
            np.testing.assert_allclose(float(m["representation_noise"]), ratio, rtol=1e-4)
            expected = 1.0 / (1.0 + ratio)
        else:
            expected = float(dreg_jax.strength_multiplier(schedule, t, 8))
        np.testing.assert_allclose(float(m["strength_multiplier"]), expected, rtol=1e-4)
        np.testing.assert_allclose(float(m["penalty"]), 10**-2.5 * expected * float(raw), rtol=1e-4)
        state = new_state


def test_constant_schedule_step_equals_default_config():
    explicit, default = config("constant"), config("constant")
    default = dataclasses.replace(default, regularizer=dreg_jax.RegularizerConfig(kind="dreg"))
    s1 = dreg_jax.create_train_state(explicit, jax.random.key(1), 6, 3)
    s2 = dreg_jax.create_train_state(default, jax.random.key(1), 6, 3)
    a, _ = dreg_jax.train_step(s1, BATCH, jax.random.key(5), explicit)
    b, _ = dreg_jax.train_step(s2, BATCH, jax.random.key(5), default)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)


def test_input_representation_reads_the_features():
    cfg = config("noise_inverse", noise_representation="input")
    state = dreg_jax.create_train_state(cfg, jax.random.key(1), 6, 3)
    _, m = dreg_jax.train_step(state, BATCH, jax.random.key(0), cfg)
    np.testing.assert_allclose(float(m["representation_noise"]), noise_ratio_reference(BATCH["x"], BATCH["y"]), rtol=1e-4)


def test_config_errors():
    with pytest.raises(ValueError, match="DREG penalty only"):
        config("cosine_decay", kind="igpen").validate()
    with pytest.raises(ValueError, match="unknown strength_schedule"):
        config("step").validate()
    with pytest.raises(ValueError, match="unknown noise_representation"):
        config("noise_inverse", noise_representation="logits").validate()
    with pytest.raises(ValueError, match="pass total_steps"):
        dreg_jax.create_train_state(config("linear_warmup"), jax.random.key(0), 6, 3)


@pytest.mark.slow  # 28 s of compiles: the schedules' formulas are checked above; `make test-slow`
def test_engine_curves_follow_the_schedule():
    data, classes = engine_data("wine")
    hp = RunHParams.stack([RunHParams(0, 1e-3, 10**-2.5, 1.0, 0.0, 0.0)])
    steps = math.ceil(len(data.x_train) / 16)  # steps per epoch
    out = {}
    for schedule in ("constant", "cosine_decay", "linear_warmup", "noise_inverse"):
        cfg = dataclasses.replace(config(schedule), epochs=4)
        _, curves = train_many(hp, data, cfg, classes, EngineOptions(diag_size=16, per_epoch_diagnostics=False))
        out[schedule] = np.asarray(curves["strength_multiplier"][0])
        if schedule == "noise_inverse":
            noise = np.asarray(curves["representation_noise"][0])
            assert np.all(noise > 0) and np.all(np.isfinite(noise))
    total = 4 * steps
    for schedule in ("constant", "cosine_decay", "linear_warmup"):
        expected = [np.mean([float(dreg_jax.strength_multiplier(schedule, e * steps + s, total)) for s in range(steps)])
                    for e in range(4)]
        np.testing.assert_allclose(out[schedule], expected, rtol=1e-5)
    assert np.all((out["noise_inverse"] > 0) & (out["noise_inverse"] <= 1))


def test_run_ids_of_existing_results_are_unchanged():
    # computed with the code before the schedule fields existed (commit b4e03cd)
    spec = RunSpec("pima", dreg_jax.TrainConfig(
        model=dreg_jax.ModelConfig(hidden=(8,), activation="chainzrule"),
        regularizer=dreg_jax.RegularizerConfig(kind="dreg"), epochs=3), seed=4, data_fraction=0.5)
    assert spec.run_id == "345975dfe9e11375"
    cosine = dataclasses.replace(spec, config=dataclasses.replace(
        spec.config, regularizer=dreg_jax.RegularizerConfig(kind="dreg", strength_schedule="cosine_decay")))
    assert cosine.run_id != spec.run_id
    assert RunSpec.from_dict(cosine.to_dict()) == cosine


def test_sweep_expands_schedules_for_dreg_only():
    specs = SweepConfig(regularizers=("none", "dreg"), seeds=1,
                        strength_schedules=("constant", "cosine_decay")).expand()
    kinds = sorted((s.config.regularizer.kind, s.config.regularizer.strength_schedule) for s in specs)
    assert kinds == [("dreg", "constant"), ("dreg", "cosine_decay"), ("none", "constant")]


def test_sweep_refuses_schedules_without_dreg():
    with pytest.raises(ValueError, match="add dreg to regularizers"):
        SweepConfig(regularizers=("igpen",), strength_schedules=("cosine_decay",)).expand()
