"""Baseline regularizers against independent references."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dreg_jax

W = jax.random.normal(jax.random.key(0), (5, 3)) / 2
X = jax.random.normal(jax.random.key(1), (4, 5))
Y = jnp.array([0, 2, 1, 2])


def net(x):
    return jnp.tanh(x @ W) @ jnp.ones((3, 3)) + x[:, :3] ** 2


def per_example_loss(x):
    return optax.softmax_cross_entropy_with_integer_labels(net(x), Y)


def test_igpen_matches_per_example_gradients():
    mean_loss, penalty = dreg_jax.input_gradient_penalty(per_example_loss, X, strength=0.3)
    chex.assert_trees_all_close(mean_loss, per_example_loss(X).mean(), rtol=1e-6)
    grads = [jax.grad(lambda row, i=i: per_example_loss(X.at[i].set(row))[i])(X[i]) for i in range(4)]
    expected = 0.3 * np.mean([np.sum(np.asarray(g) ** 2) for g in grads])
    np.testing.assert_allclose(penalty, expected, rtol=1e-5)


def test_igpen_aux_returns_logits_without_changing_values():
    m1, p1 = dreg_jax.input_gradient_penalty(per_example_loss, X, strength=0.3)
    m2, p2, logits = dreg_jax.input_gradient_penalty(
        lambda x: (per_example_loss(x), net(x)), X, strength=0.3, has_aux=True)
    chex.assert_trees_all_close((m1, p1), (m2, p2))
    chex.assert_trees_all_close(logits, net(X))


def test_igpen_is_differentiable_twice():
    def total(w):
        loss = lambda x: optax.softmax_cross_entropy_with_integer_labels(jnp.tanh(x @ w), Y)
        m, p = dreg_jax.input_gradient_penalty(loss, X)
        return m + p
    g = jax.jit(jax.grad(total))(W)
    eps = 1e-3
    fd = (total(W.at[0, 0].add(eps)) - total(W.at[0, 0].add(-eps))) / (2 * eps)
    np.testing.assert_allclose(g[0, 0], fd, rtol=2e-2, atol=1e-4)


def test_network_jacobian_penalty_matches_jacrev_frobenius():
    full = jax.vmap(jax.jacrev(lambda row: net(row[None])[0]))(X)
    frob = np.mean(np.sum(np.asarray(full) ** 2, axis=(1, 2)))
    y, pen = dreg_jax.network_jacobian_penalty(net, X, jax.random.key(2), strength=0.2, num_projections=6000)
    chex.assert_trees_all_close(y, net(X), rtol=1e-6)
    np.testing.assert_allclose(pen, 0.1 * frob, rtol=0.04)  # strength/2 * ||J||_F^2, sampled
    _, single = dreg_jax.network_jacobian_penalty(net, X, jax.random.key(2), strength=0.2)
    assert np.isfinite(single) and single > 0


def _run_transform(grads_seq, params, **kw):
    tx = dreg_jax.coherent_strong_regularization(**kw)
    state, outs = tx.init(params), []
    for g in grads_seq:
        u, state = tx.update(g, state, params)
        outs.append((u, state))
    return outs


def test_coherent_regularization_on_when_gradients_agree():
    params = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 0.5])}
    outs = _run_transform([g] * 5, params, l2=0.1, l1=0.01, threshold=0.5)
    for u, s in outs:
        np.testing.assert_allclose(s.coherence, 1.0, rtol=1e-5)
        assert bool(s.active)
        chex.assert_trees_all_close(u["w"], g["w"] + 0.1 * params["w"] + 0.01 * jnp.sign(params["w"]))


def test_coherent_regularization_off_when_gradients_cancel():
    params = {"w": jnp.array([1.0, -2.0])}
    seq = [{"w": jnp.array([1.0, 1.0]) * (-1) ** t} for t in range(20)]
    outs = _run_transform(seq, params, l2=0.1, decay=0.9, threshold=0.5)
    u, s = outs[-1]
    # alternating signs: the EMA of g is ~ (1 - beta) / (1 + beta) of |g| -> coherence ~ 0.003
    assert float(s.coherence) < 0.05 and not bool(s.active)
    chex.assert_trees_all_close(u, seq[-1])


def test_coherent_regularization_validates_and_needs_params():
    with pytest.raises(ValueError, match="decay"):
        dreg_jax.coherent_strong_regularization(decay=1.0)
    tx = dreg_jax.coherent_strong_regularization()
    p = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(p, tx.init(p))


def test_coherent_regularization_jits_in_an_optax_chain():
    tx = optax.chain(dreg_jax.coherent_strong_regularization(), optax.adam(1e-2))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    u, state = step({"w": jnp.ones(3)}, state, params)
    assert np.isfinite(np.asarray(u["w"])).all()
