"""layer_jacobian_sq_norms and dreg_penalty against brute-force Jacobians (jax.jacfwd)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import dreg_jax

BATCH, DIM = 5, 7


def brute_force_sq_norm(fn, x):
    """Mean over rows of ||J||_F^2 where J is the full per-row Jacobian from jax.jacfwd."""
    per_row = jax.vmap(lambda row: jnp.sum(jax.jacfwd(lambda r: fn(r[None])[0])(row) ** 2))(x)
    return jnp.mean(per_row)


def cubic(z):
    return dreg_jax.cubic_value_and_derivative(z, jnp.array([[0.1, 0.6, 0.2, -0.05]]), 4.0)[0]


ELEMENTWISE = {"tanh": jnp.tanh, "gelu": jax.nn.gelu, "softplus": jax.nn.softplus, "cubic": cubic}


def dense_layer(key, d_in, d_out, act=jnp.tanh, dtype=jnp.float32):
    k1, k2 = jax.random.split(key)
    w = (jax.random.normal(k1, (d_in, d_out)) / np.sqrt(d_in)).astype(dtype)
    b = (0.1 * jax.random.normal(k2, (d_out,))).astype(dtype)
    return lambda h: act(h @ w + b), (w, b)


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
@pytest.mark.parametrize("jit", [False, True])
def test_elementwise_layers_exact_with_one_probe(name, jit):
    fn = ELEMENTWISE[name]
    x = 1.5 * jax.random.normal(jax.random.key(0), (BATCH, DIM))
    run = jax.jit(dreg_jax.layer_jacobian_sq_norms, static_argnums=(0, 3)) if jit else dreg_jax.layer_jacobian_sq_norms
    y, sq = run((fn,), x, jax.random.key(1), 1)
    chex.assert_trees_all_close(y, fn(x), rtol=1e-6, atol=1e-6)  # jit vs eager: float32 rounding apart
    chex.assert_trees_all_close(sq[0], brute_force_sq_norm(fn, x), rtol=1e-5)


def test_chain_output_is_plain_composition_and_terms_per_layer():
    key = jax.random.key(2)
    f1, _ = dense_layer(key, DIM, 6)
    f2 = jax.nn.gelu
    f3, _ = dense_layer(jax.random.key(3), 6, 4, act=lambda z: z)
    x = jax.random.normal(jax.random.key(4), (BATCH, DIM))
    y, sq = dreg_jax.layer_jacobian_sq_norms([f1, f2, f3], x, jax.random.key(5))
    chex.assert_trees_all_close(y, f3(f2(f1(x))), rtol=1e-6)
    chex.assert_shape(sq, (3,))
    # the elementwise middle layer is exact whatever the probe
    chex.assert_trees_all_close(sq[1], brute_force_sq_norm(f2, f1(x)), rtol=1e-5)


@pytest.mark.parametrize("d_in,d_out", [(7, 5), pytest.param(3, 9, marks=pytest.mark.slow)])
def test_dense_layer_mean_over_many_probes_matches_frobenius(d_in, d_out):
    fn, (w, b) = dense_layer(jax.random.key(6), d_in, d_out)
    x = jax.random.normal(jax.random.key(7), (4, d_in))
    exact = brute_force_sq_norm(fn, x)
    # closed form for tanh(xW + b): sum_j tanh'(z_j)^2 ||W[:, j]||^2, an independent check
    slope = 1 - jnp.tanh(x @ w + b) ** 2
    closed = jnp.mean(jnp.sum(slope**2 * jnp.sum(w**2, axis=0), axis=1))
    chex.assert_trees_all_close(exact, closed, rtol=1e-5)
    _, sq = dreg_jax.layer_jacobian_sq_norms([fn], x, jax.random.key(8), num_probes=4000)
    # 16,000 probe samples: relative standard error well under 1%; allow 3%
    np.testing.assert_allclose(sq[0], exact, rtol=0.03)
    _, one = dreg_jax.layer_jacobian_sq_norms([fn], x, jax.random.key(8), num_probes=1)
    assert not np.isclose(one[0], exact, rtol=1e-4)  # a single probe is an estimate, not exact


def test_multiple_probes_share_one_primal():
    fn, _ = dense_layer(jax.random.key(9), DIM, 6)
    x = jax.random.normal(jax.random.key(10), (BATCH, DIM))
    y1, _ = dreg_jax.layer_jacobian_sq_norms([fn], x, jax.random.key(0), num_probes=1)
    y8, _ = dreg_jax.layer_jacobian_sq_norms([fn], x, jax.random.key(0), num_probes=8)
    chex.assert_trees_all_close(y1, y8)


def _penalty_of_params(params, x, key, scaling="width"):
    fns = [lambda h, p=p: jnp.tanh(h @ p[0] + p[1]) for p in params]
    _, sq = dreg_jax.layer_jacobian_sq_norms(fns, x, key)
    widths = dreg_jax.layer_widths(fns, x)
    return dreg_jax.dreg_penalty(sq, widths, scaling=scaling)


def _params(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(11), 2)
    return [dense_layer(keys[0], 4, 6, dtype=dtype)[1], dense_layer(keys[1], 6, 3, dtype=dtype)[1]]


@pytest.mark.parametrize("scaling", [pytest.param("width", marks=pytest.mark.slow), "none"])
def test_penalty_gradient_matches_finite_differences(x64, scaling):
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), _params())
    x = jax.random.normal(jax.random.key(12), (3, 4), jnp.float64)
    f = lambda p: _penalty_of_params(p, x, jax.random.key(13), scaling)
    check_grads(f, (params,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
    check_grads(f, (params,), order=1, modes=["fwd"], atol=1e-6, rtol=1e-6)


def test_penalty_formula_width_scaling():
    sq = jnp.array([6.0, 12.0])
    np.testing.assert_allclose(dreg_jax.dreg_penalty(sq, (3, 4), strength=0.5, scaling="width"), 0.5 * (2.0 + 3.0))
    np.testing.assert_allclose(dreg_jax.dreg_penalty(sq, scaling="none", strength=0.5), 9.0)
    np.testing.assert_allclose(dreg_jax.dreg_penalty(sq, strength=0.5), 9.0)  # default: raw sum
    np.testing.assert_allclose(
        dreg_jax.dreg_penalty(sq, (3, 4), strength=1.0, scaling="width", layer_weights=jnp.array([1.0, 0.0])), 2.0
    )
    np.testing.assert_allclose(dreg_jax.dreg_penalty(sq, (1, 1)), 10**-2.5 * 18, rtol=1e-6)


def test_jit_equals_eager_and_grad_under_jit():
    params, x, key = _params(), jax.random.normal(jax.random.key(14), (8, 4)), jax.random.key(15)
    eager = _penalty_of_params(params, x, key)
    jitted = jax.jit(_penalty_of_params)(params, x, key)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6)
    g_eager = jax.grad(_penalty_of_params)(params, x, key)
    g_jit = jax.jit(jax.grad(_penalty_of_params))(params, x, key)
    chex.assert_trees_all_close(g_eager, g_jit, rtol=1e-5, atol=1e-8)


def test_vmap_over_seeds_equals_python_loop():
    params, x = _params(), jax.random.normal(jax.random.key(16), (8, 4))
    keys = jax.random.split(jax.random.key(17), 5)
    batched = jax.vmap(lambda k: _penalty_of_params(params, x, k))(keys)
    looped = jnp.stack([_penalty_of_params(params, x, k) for k in keys])
    chex.assert_trees_all_close(batched, looped, rtol=1e-6)
    assert len(np.unique(np.asarray(looped))) > 1  # seeds really differ (layer scope is stochastic)


def test_vmap_over_batch_and_lambda():
    params, x, key = _params(), jax.random.normal(jax.random.key(18), (8, 4)), jax.random.key(19)
    fns = [lambda h, p=p: jnp.tanh(h @ p[0] + p[1]) for p in params]
    # vmap over single-example batches: per-example terms average to the batch term (exact layers)
    per_example = jax.vmap(lambda row: dreg_jax.layer_jacobian_sq_norms([jnp.tanh], row[None], key)[1])(x)
    _, whole = dreg_jax.layer_jacobian_sq_norms([jnp.tanh], x, key)
    chex.assert_trees_all_close(per_example.mean(0), whole, rtol=1e-6)
    _, sq = dreg_jax.layer_jacobian_sq_norms(fns, x, key)
    lams = jnp.array([0.0, 1e-3, 1e-2])
    pens = jax.vmap(lambda strength: dreg_jax.dreg_penalty(sq, (6, 3), strength=strength, scaling="width"))(lams)
    chex.assert_trees_all_close(pens, lams * (sq[0] / 6 + sq[1] / 3), rtol=1e-6)


def test_bfloat16_runs_and_tracks_float32():
    params32 = _params()
    params16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params32)
    x = jax.random.normal(jax.random.key(20), (16, 4))
    p32 = _penalty_of_params(params32, x, jax.random.key(21))
    p16 = _penalty_of_params(params16, x.astype(jnp.bfloat16), jax.random.key(21))
    assert p16.dtype == jnp.float32  # squares accumulated in float32
    np.testing.assert_allclose(p16, p32, rtol=0.05)
    g = jax.grad(_penalty_of_params)(params16, x.astype(jnp.bfloat16), jax.random.key(21))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(g))
    assert all(np.isfinite(np.asarray(leaf, np.float32)).all() for leaf in jax.tree_util.tree_leaves(g))


# --- bad input -------------------------------------------------------------------------------
X = jnp.ones((3, 4))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: dreg_jax.layer_jacobian_sq_norms([], X, jax.random.key(0)), ValueError, "empty"),
        (lambda: dreg_jax.layer_jacobian_sq_norms([3], X, jax.random.key(0)), TypeError, "not callable"),
        (lambda: dreg_jax.layer_jacobian_sq_norms([jnp.tanh], jnp.ones((3, 4), jnp.int32), jax.random.key(0)), TypeError, "floating"),
        (lambda: dreg_jax.layer_jacobian_sq_norms([jnp.tanh], jnp.ones(4), jax.random.key(0)), ValueError, "at least 2"),
        (lambda: dreg_jax.layer_jacobian_sq_norms([jnp.tanh], X.at[0, 0].set(jnp.nan), jax.random.key(0)), ValueError, "NaN"),
        (lambda: dreg_jax.layer_jacobian_sq_norms([jnp.tanh], X.at[1, 1].set(jnp.inf), jax.random.key(0)), ValueError, "NaN/inf"),
        (lambda: dreg_jax.layer_jacobian_sq_norms([lambda h: h[:2]], X, jax.random.key(0)), ValueError, "keeping batch=3"),
        (lambda: dreg_jax.layer_jacobian_sq_norms([jnp.tanh], X, jax.random.key(0), num_probes=0), ValueError, "positive integer"),
        (lambda: dreg_jax.dreg_penalty(jnp.ones(2), (3, 4), scaling="fan_in"), ValueError, "none, width"),
        (lambda: dreg_jax.dreg_penalty(jnp.ones(2), scaling="width"), ValueError, "needs widths"),
        (lambda: dreg_jax.dreg_penalty(jnp.ones(2), (3,), scaling="width"), ValueError, "2 positive ints"),
        (lambda: dreg_jax.dreg_penalty(jnp.ones((2, 2)), (3, 4)), ValueError, "1-D"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, error, match):
    with pytest.raises(error, match=match):
        call()
