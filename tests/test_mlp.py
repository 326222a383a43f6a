"""MLP builder: one pass returns logits and per-layer DREG terms that match brute force."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreg_jax import MLP

X = jax.random.normal(jax.random.key(0), (6, 5))


def make(activation="gelu", **kw):
    model = MLP(hidden=(8, 7), num_classes=3, activation=activation, **kw)
    return model, model.init(jax.random.key(1), X)


def pre_activations(model, variables, x):
    """z_l and the layer inputs, recomputed independently from the parameters."""
    zs, h = [], x
    for i in range(len(model.hidden)):
        p = variables["params"][f"dense_{i}"]
        z = h @ p["kernel"] + p["bias"]
        zs.append(z)
        h = model.apply(variables, z, method=lambda m, zz, i=i: m._activate(zz, i))
    return zs


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "silu", "chainzrule"])
def test_activation_scope_matches_jacfwd_of_each_activation(activation):
    model, variables = make(activation)
    logits, sq = model.apply(variables, X, method=MLP.forward_with_jacobian_terms)
    chex.assert_trees_all_close(logits, model.apply(variables, X), rtol=1e-6)
    for i, z in enumerate(pre_activations(model, variables, X)):
        act = lambda zz, i=i: model.apply(variables, zz, method=lambda m, u: m._activate(u, i))
        jac = jax.vmap(lambda row: jax.jacfwd(lambda r: act(r[None])[0])(row))(z)
        np.testing.assert_allclose(sq[i], jnp.mean(jnp.sum(jac**2, axis=(1, 2))), rtol=1e-5)


@pytest.mark.parametrize(
    "estimator,num_probes,rtol", [pytest.param("probe", 3000, 0.04, marks=pytest.mark.slow), ("exact", 1, 1e-5)]
)
@pytest.mark.parametrize("activation,spectral_norm", [("tanh", False), ("chainzrule", False), ("gelu", True)])
def test_layer_scope_matches_jacfwd_of_dense_plus_activation(activation, spectral_norm, estimator, num_probes, rtol):
    model, variables = make(activation, spectral_norm=spectral_norm)
    logits, sq = model.apply(
        variables, X, jax.random.key(2), jacobian_scope="layer", num_probes=num_probes,
        layer_estimator=estimator, method=MLP.forward_with_jacobian_terms,
    )
    chex.assert_trees_all_close(logits, model.apply(variables, X), rtol=1e-5)
    h = X
    for i in range(2):
        layer = lambda inp, i=i: model.apply(variables, inp, i, method=MLP.hidden_layer)
        jac = jax.vmap(lambda row: jax.jacfwd(lambda r: layer(r[None])[0])(row))(h)
        np.testing.assert_allclose(sq[i], jnp.mean(jnp.sum(jac**2, axis=(1, 2))), rtol=rtol)
        h = layer(h)


def test_spectral_norm_updates_stats_and_bounds_sigma():
    model, variables = make("relu", spectral_norm=True)
    assert "batch_stats" in variables
    variables = {**variables}
    for _ in range(30):  # power iteration converges to the top singular value
        _, updates = model.apply(variables, X, update_stats=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
    kernel = variables["params"]["dense_0"]["layer_instance"]["kernel"]
    sigma = variables["batch_stats"]["dense_0"]["layer_instance/kernel/sigma"]
    np.testing.assert_allclose(sigma, np.linalg.svd(np.asarray(kernel), compute_uv=False)[0], rtol=1e-3)
    for scope in ["activation", "layer"]:
        (logits, sq), _ = model.apply(
            variables, X, jax.random.key(0), jacobian_scope=scope, update_stats=True,
            mutable=["batch_stats"], method=MLP.forward_with_jacobian_terms,
        )
        assert np.isfinite(np.asarray(sq)).all() and logits.shape == (6, 3)


def test_bfloat16_model():
    model = MLP(hidden=(8,), num_classes=3, activation="chainzrule", dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(1), X)
    logits, sq = model.apply(variables, X, method=MLP.forward_with_jacobian_terms)
    assert logits.dtype == jnp.bfloat16 and sq.dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs,x,match",
    [
        (dict(activation="swish2"), X, "relu, gelu, tanh"),
        (dict(hidden=()), X, "non-empty"),
        ({}, jnp.ones((2, 3, 5)), "2 dimensions"),
        ({}, jnp.ones((2, 5), jnp.int32), "floating"),
        ({}, X.at[0, 0].set(jnp.nan), "NaN"),
    ],
)
def test_bad_model_input(kwargs, x, match):
    model = MLP(**{"hidden": (4,), "num_classes": 2, **kwargs})
    with pytest.raises((ValueError, TypeError), match=match):
        model.init(jax.random.key(0), x)


def test_unknown_scope_estimator_and_missing_key():
    model, variables = make()
    with pytest.raises(ValueError, match="probe, exact"):
        model.apply(variables, X, jacobian_scope="layer", layer_estimator="hutch",
                    method=MLP.forward_with_jacobian_terms)
    with pytest.raises(ValueError, match="activation, layer"):
        model.apply(variables, X, jacobian_scope="net", method=MLP.forward_with_jacobian_terms)
    with pytest.raises(ValueError, match="PRNG key"):
        model.apply(variables, X, jacobian_scope="layer", method=MLP.forward_with_jacobian_terms)
