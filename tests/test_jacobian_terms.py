"""jacobian_terms on user models (linen and NNX) against brute-force Jacobians of each submodule.

References are independent of the code under test: each submodule's input is captured by a
plain interceptor (linen) or an explicit forward (NNX), the submodule is applied alone with its
own parameters, and ``jax.jacfwd`` gives the full per-example Jacobian.
"""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dreg_jax

B = 3


# ---------------------------------------------------------------- linen models
class FFN(nn.Module):
    d: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.d, name="fc2")(dreg_jax.Activation(nn.gelu, name="act")(nn.Dense(self.hidden, name="fc1")(x)))


class PreLNBlock(nn.Module):
    d: int = 8
    heads: int = 2

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(self.heads, qkv_features=self.d, name="attn")(nn.LayerNorm(name="ln1")(x))
        return x + FFN(self.d, 2 * self.d, name="mlp")(nn.LayerNorm(name="ln2")(x))


class Transformer(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="embed")(x)
        x = PreLNBlock(name="block")(x)
        return nn.Dense(3, name="head")(x.mean(axis=1))


class ResidualMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, name="inp")(x)
        for i in range(2):
            x = x + FFN(6, 12, name=f"mlp{i}")(x)
        return nn.Dense(3, name="head")(x)


class DenseTanh(nn.Module):
    @nn.compact
    def __call__(self, x):
        return dreg_jax.Activation(jnp.tanh, name="act")(nn.Dense(7, name="dense")(x))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), strides=2, padding="SAME", name="conv1")(x)
        x = dreg_jax.Activation(nn.gelu, name="act1")(x)
        x = nn.Sequential([nn.Conv(5, (3, 3)), dreg_jax.Activation(jnp.tanh)], name="conv2")(x)
        x = DenseTanh(name="fc")(x.reshape(x.shape[0], -1))
        return nn.Dense(3, name="head")(x)


def sub_params(params, path):
    """The params sub-tree of the submodule at ``path``, as that module alone expects them."""
    if path == "conv2":  # nn.Sequential's layers were made in CNN's scope (Conv_0)
        return {"layers_0": params["Conv_0"]}
    for part in path.split("/"):
        params = params[part]
    return params


def sub_apply(model, params, path, h, module):
    """The submodule at ``path`` applied alone, with its own parameters."""
    return module.apply({"params": sub_params(params, path)}, h)


LINEN = {
    "transformer": (Transformer, (B, 4, 5), {
        "block/attn": nn.MultiHeadDotProductAttention(2, qkv_features=8),
        "block/mlp": FFN(8, 16),
        "block/mlp/fc1": nn.Dense(16),
    }),
    "residual_mlp": (ResidualMLP, (B, 5), {"mlp0": FFN(6, 12), "mlp1": FFN(6, 12), "mlp0/fc2": nn.Dense(6)}),
    "cnn": (CNN, (B, 8, 8, 2), {
        "conv1": nn.Conv(4, (3, 3), strides=2, padding="SAME"),
        "conv2": nn.Sequential([nn.Conv(5, (3, 3)), dreg_jax.Activation(jnp.tanh)]),
        "fc": DenseTanh(),
    }),
}


def setup_linen(name, dtype=jnp.float32):
    cls, shape, subs = LINEN[name]
    model = cls()
    x = jax.random.normal(jax.random.key(0), shape)
    variables = model.init(jax.random.key(1), x)
    return model, variables, x.astype(dtype), subs


def captured_inputs(model, variables, x):
    seen = {}

    def capture(fun, args, kwargs, ctx):
        if ctx.method_name == "__call__" and ctx.module.scope is not None and ctx.module.scope.path:
            seen.setdefault("/".join(ctx.module.scope.path), args[0])
        return fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        model.apply(variables, x)
    return seen


def brute_force(fn, h):
    """Per-row ||J||_F^2 and the Rademacher estimator's per-row variance 2(||A||_F^2 - sum A_ii^2)."""
    def per_row(row):
        j = jax.jacfwd(lambda r: fn(r[None])[0])(row)
        j = j.reshape(int(np.prod(j.shape[: j.ndim - row.ndim])), -1)
        a = j.T @ j
        return jnp.trace(a), 2 * (jnp.sum(a * a) - jnp.sum(jnp.diag(a) ** 2))
    frob, var = jax.jit(jax.vmap(per_row))(h)  # one compiled program instead of eager op dispatch
    return jnp.mean(frob), jnp.mean(var)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("cnn", "transformer") else n for n in sorted(LINEN)])
def test_linen_probe_terms_match_brute_force_jacobians(name):
    model, variables, x, subs = setup_linen(name)
    paths, probes = list(subs), 500
    out, terms = jax.jit(lambda v, x: dreg_jax.jacobian_terms(model, v, x, key=jax.random.key(2), layers=paths,
                                                              num_probes=probes))(variables, x)
    chex.assert_trees_all_close(out, model.apply(variables, x), rtol=1e-5, atol=1e-6)
    inputs = captured_inputs(model, variables, x)
    assert set(terms) == set(paths)
    for path, module in subs.items():
        frob, var = brute_force(lambda h: sub_apply(model, variables["params"], path, h, module), inputs[path])
        se = float(np.sqrt(var / (probes * x.shape[0])))
        assert abs(float(terms[path]) - float(frob)) <= 3 * se + 1e-5 * float(frob), (path, terms[path], frob, se)


def test_linen_exact_and_activation_scopes_match_brute_force_to_1e5():
    model, variables, x, subs = setup_linen("cnn")
    inputs = captured_inputs(model, variables, x)
    _, exact = dreg_jax.jacobian_terms(model, variables, x, layers=list(subs), estimator="exact")
    for path, module in subs.items():
        frob, _ = brute_force(lambda h: sub_apply(model, variables["params"], path, h, module), inputs[path])
        np.testing.assert_allclose(exact[path], frob, rtol=1e-5)
    _, act = dreg_jax.jacobian_terms(model, variables, x, scope="activation")
    assert list(act) == ["act1", "Activation_0", "fc/act"]  # every marked activation, call order
    for path in act:
        frob, _ = brute_force(nn.gelu if path == "act1" else jnp.tanh, inputs[path])
        np.testing.assert_allclose(act[path], frob, rtol=1e-5)


def test_residual_branch_not_identity_plus_jacobian():
    model, variables, x, subs = setup_linen("residual_mlp")
    _, terms = dreg_jax.jacobian_terms(model, variables, x, layers=["mlp0"], estimator="probe",
                                       key=jax.random.key(0), num_probes=2000)
    inputs = captured_inputs(model, variables, x)
    branch, _ = brute_force(lambda h: sub_apply(model, variables["params"], "mlp0", h, FFN(6, 12)), inputs["mlp0"])
    with_skip, _ = brute_force(lambda h: h + sub_apply(model, variables["params"], "mlp0", h, FFN(6, 12)), inputs["mlp0"])
    assert abs(float(terms["mlp0"]) - float(branch)) < abs(float(terms["mlp0"]) - float(with_skip))


@pytest.mark.parametrize("name", [pytest.param("transformer", marks=pytest.mark.slow), "residual_mlp", pytest.param("cnn", marks=pytest.mark.slow)])
def test_linen_term_gradients_equal_direct_gradients_with_same_probes(name):
    model, variables, x, subs = setup_linen(name)
    path = list(subs)[1]
    module = subs[path]
    key = jax.random.key(3)
    h = captured_inputs(model, variables, x)[path]

    def total(params):
        return dreg_jax.jacobian_terms(model, {"params": params}, x, key=key, layers=[path])[1][path]

    grads = jax.grad(total)(variables["params"])
    v = dreg_jax.rademacher(jax.random.fold_in(dreg_jax.call_key(key, 0), 0), (1,) + h.shape, h.dtype)[0]

    def direct(sub_params):
        _, jv = jax.jvp(lambda inp: module.apply({"params": sub_params}, inp), (h,), (v,))
        return jnp.mean(jnp.sum(jnp.square(jv).reshape(h.shape[0], -1), axis=-1))

    chex.assert_trees_all_close(sub_params(grads, path), jax.grad(direct)(sub_params(variables["params"], path)),
                                rtol=1e-4, atol=1e-6)
    # jit gives the same gradient
    chex.assert_trees_all_close(jax.jit(jax.grad(total))(variables["params"]), grads, rtol=1e-4, atol=1e-6)


def test_bfloat16_terms_within_one_percent_of_float32():
    model, variables, x, subs = setup_linen("residual_mlp")
    bf_vars = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), variables)
    layers = list(subs)
    key = jax.random.key(4)
    _, t32 = dreg_jax.jacobian_terms(model, variables, x, key=key, layers=layers)
    _, t16 = dreg_jax.jacobian_terms(model, bf_vars, x.astype(jnp.bfloat16), key=key, layers=layers)
    for path in layers:
        assert t16[path].dtype == jnp.float32
        np.testing.assert_allclose(float(t16[path]), float(t32[path]), rtol=0.01)


@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
def test_vmap_over_seeds_equals_loop_and_row_subsampling_is_unbiased():
    model, variables, x, _ = setup_linen("residual_mlp")
    x = jnp.concatenate([x] * 8)  # 24 rows
    keys = jax.random.split(jax.random.key(5), 400)

    def term(key, fraction):
        return dreg_jax.jacobian_terms(model, variables, x, key=key, layers=["mlp0"], row_fraction=fraction)[1]["mlp0"]

    full = jax.vmap(lambda k: term(k, 1.0))(keys)
    np.testing.assert_allclose(full[:3], [term(k, 1.0) for k in keys[:3]], rtol=1e-6)
    sub = jax.vmap(lambda k: term(k, 0.25))(keys)
    mean_full = float(jnp.mean(full))
    se = float(jnp.std(sub) / np.sqrt(len(keys)))
    assert abs(float(jnp.mean(sub)) - mean_full) < 3 * se + 3 * float(jnp.std(full) / np.sqrt(len(keys)))
    assert float(jnp.var(sub)) > float(jnp.var(full))  # fewer rows, more variance


def test_repeated_calls_get_one_entry_per_call():
    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(5, name="shared")
            return dense(jnp.tanh(dense(x)))

    model = Shared()
    x = jnp.ones((2, 5))
    variables = model.init(jax.random.key(0), x)
    _, terms = dreg_jax.jacobian_terms(model, variables, x, layers=["shared"], estimator="exact")
    assert list(terms) == ["shared#0", "shared#1"]
    w = variables["params"]["shared"]["kernel"]
    np.testing.assert_allclose([terms["shared#0"], terms["shared#1"]], [jnp.sum(w**2)] * 2, rtol=1e-6)


def test_dropout_and_batch_stats_pass_through():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
            x = nn.Dropout(0.5, deterministic=not train)(FFN(4, 8, name="mlp")(x))
            return x

    model = Net()
    x = jax.random.normal(jax.random.key(0), (6, 4))
    variables = model.init(jax.random.key(1), x, train=False)
    rngs = {"dropout": jax.random.key(2)}
    out, terms = dreg_jax.jacobian_terms(model, variables, x, True, key=jax.random.key(3),
                                         layers=["mlp", "bn"], rngs=rngs, mutable=["batch_stats"])
    ref = model.apply(variables, x, True, rngs=rngs, mutable=["batch_stats"])
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-6)
    assert set(terms) == {"mlp", "bn"}
    with pytest.raises(ValueError, match="changed its mutable state"):
        dreg_jax.jacobian_terms(model, variables, x, True, key=jax.random.key(3), layers=["bn"],
                                row_fraction=0.5, rngs=rngs, mutable=["batch_stats"])


def test_clear_errors():
    model, variables, x, _ = setup_linen("residual_mlp")
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"\['mlp9'\].*mlp0 \(FFN\), mlp0/act \(Activation\)"):
        dreg_jax.jacobian_terms(model, variables, x, key=key, layers=["mlp9"])
    with pytest.raises(ValueError, match=r"layers=\[\] selects nothing"):
        dreg_jax.jacobian_terms(model, variables, x, key=key, layers=[])
    with pytest.raises(ValueError, match="needs layers"):
        dreg_jax.jacobian_terms(model, variables, x, key=key)
    with pytest.raises(ValueError, match="pass key"):
        dreg_jax.jacobian_terms(model, variables, x, layers=["mlp0"])
    with pytest.raises(ValueError, match="no closed form for 'mlp0'.*Dense, Activation, Dense"):
        dreg_jax.jacobian_terms(model, variables, x, layers=["mlp0"], estimator="exact")
    with pytest.raises(ValueError, match="row_fraction"):
        dreg_jax.jacobian_terms(model, variables, x, key=key, layers=["mlp0"], row_fraction=0.0)
    with pytest.raises(ValueError, match="empty batch"):
        dreg_jax.jacobian_terms(model, variables, x[:0], key=key, layers=["mlp0"])

    class Pool(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(x).sum(axis=0)

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Pool(name="pool")(x)

    pooled = Outer()
    pv = pooled.init(key, x)
    with pytest.raises(ValueError, match="'pool' must map .* keep the batch axis"):
        dreg_jax.jacobian_terms(pooled, pv, x, key=key, layers=["pool"])


# ---------------------------------------------------------------- NNX models
class NNXFFN(nnx.Module):
    def __init__(self, d, hidden, rngs):
        self.fc1 = nnx.Linear(d, hidden, rngs=rngs)
        self.act = dreg_jax.NNXActivation(nnx.gelu)
        self.fc2 = nnx.Linear(hidden, d, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class NNXResidual(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([NNXFFN(5, 10, rngs) for _ in range(2)])
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_nnx_mlp_terms_and_gradients():
    model = NNXFFN(5, 10, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (B, 5))
    out, exact = dreg_jax.jacobian_terms(model, None, x, layers=["fc1", "act", "fc2"], estimator="exact")
    chex.assert_trees_all_close(out, model(x), rtol=1e-6)
    h_act = model.fc1(x)
    np.testing.assert_allclose(exact["fc1"], brute_force(model.fc1, x)[0], rtol=1e-5)
    np.testing.assert_allclose(exact["act"], brute_force(model.act, h_act)[0], rtol=1e-5)
    np.testing.assert_allclose(exact["fc2"], brute_force(model.fc2, model.act(h_act))[0], rtol=1e-5)
    _, act = dreg_jax.jacobian_terms(model, None, x, scope="activation")
    np.testing.assert_allclose(act["act"], exact["act"], rtol=1e-6)

    key = jax.random.key(1)

    def loss(m):
        return dreg_jax.jacobian_terms(m, None, x, key=key, layers=["fc1"])[1]["fc1"] * 0 + \
            dreg_jax.jacobian_terms(m, None, x, key=key, layers=["act"])[1]["act"]

    grads = nnx.grad(loss)(model)
    jit_grads = nnx.jit(nnx.grad(loss))(model)
    v = dreg_jax.rademacher(jax.random.fold_in(dreg_jax.call_key(key, 0), 0), (1, B, 10))[0]

    def direct(kernel, bias):
        z = x @ kernel + bias
        _, jv = jax.jvp(nnx.gelu, (z,), (v,))
        return jnp.mean(jnp.sum(jv**2, -1))

    ref = jax.grad(direct, argnums=(0, 1))(model.fc1.kernel[...], model.fc1.bias[...])
    np.testing.assert_allclose(grads.fc1.kernel[...], ref[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads.fc1.bias[...], ref[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(jit_grads.fc1.kernel[...], ref[0], rtol=1e-4, atol=1e-6)


def test_nnx_residual_probe_terms_match_brute_force_and_model_is_unchanged():
    model = NNXResidual(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (B, 5))
    before = nnx.graphdef(model)
    probes = 800
    out, terms = dreg_jax.jacobian_terms(model, None, x, key=jax.random.key(2),
                                         layers=["blocks/0", "blocks/1", "blocks/1/fc1"], num_probes=probes)
    chex.assert_trees_all_close(out, model(x), rtol=1e-5)
    assert nnx.graphdef(model) == before and type(model.blocks[0]) is NNXFFN
    h1 = x + model.blocks[0](x)
    for path, fn, h in [("blocks/0", model.blocks[0], x), ("blocks/1", model.blocks[1], h1),
                        ("blocks/1/fc1", model.blocks[1].fc1, h1)]:
        frob, var = brute_force(fn, h)
        se = float(np.sqrt(var / (probes * B)))
        assert abs(float(terms[path]) - float(frob)) <= 3 * se + 1e-5 * float(frob), (path, terms[path], frob)

    # the branch's gradient, through nnx.value_and_grad, equals the direct one with the same probe
    key = jax.random.key(3)
    grads = nnx.grad(lambda m: dreg_jax.jacobian_terms(m, None, x, key=key, layers=["blocks/1"])[1]["blocks/1"])(model)
    v = dreg_jax.rademacher(jax.random.fold_in(dreg_jax.call_key(key, 0), 0), (1, B, 5))[0]
    graphdef, state = nnx.split(model.blocks[1])

    def direct(state):
        _, jv = jax.jvp(lambda h: nnx.merge(graphdef, state)(h), (h1,), (v,))
        return jnp.mean(jnp.sum(jv**2, -1))

    ref = jax.grad(direct)(state)
    np.testing.assert_allclose(grads.blocks[1].fc1.kernel[...], ref["fc1"]["kernel"][...], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads.blocks[1].fc2.kernel[...], ref["fc2"]["kernel"][...], rtol=1e-4, atol=1e-6)


def test_nnx_errors_list_paths():
    model = NNXResidual(nnx.Rngs(0))
    x = jnp.ones((2, 5))
    with pytest.raises(ValueError, match=r"blocks/0 \(NNXFFN\), blocks/0/act \(NNXActivation\)"):
        dreg_jax.jacobian_terms(model, None, x, key=jax.random.key(0), layers=["blocks/3"])
    with pytest.raises(TypeError, match="variables=None"):
        dreg_jax.jacobian_terms(model, {"params": {}}, x, key=jax.random.key(0), layers=["head"])


# ---------------------------------------------------------------- dreg_penalty on term dicts
def test_dreg_penalty_on_term_dicts_widths_and_bad_values():
    model, variables, x, _ = setup_linen("cnn")
    layers = ["conv1", "conv2", "fc"]
    _, terms = dreg_jax.jacobian_terms(model, variables, x, layers=layers, estimator="exact")
    widths = dreg_jax.term_widths(model, variables, x, layers=layers, estimator="exact")
    assert widths == {"conv1": 4 * 4 * 4, "conv2": 4 * 4 * 5, "fc": 7}
    raw = sum(float(v) for v in terms.values())
    np.testing.assert_allclose(dreg_jax.dreg_penalty(terms, strength=0.1), 0.1 * raw, rtol=1e-6)
    scaled = sum(float(terms[k]) / widths[k] for k in layers)
    np.testing.assert_allclose(dreg_jax.dreg_penalty(terms, widths, strength=0.1, scaling="width"), 0.1 * scaled, rtol=1e-6)
    # integers are promoted, never truncated; bad coefficients are refused
    np.testing.assert_allclose(dreg_jax.dreg_penalty(jnp.array([1, 2, 3]), strength=0.5), 3.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite scalar >= 0"):
            dreg_jax.dreg_penalty(terms, strength=bad)


@pytest.mark.parametrize("jit", [False, True])
def test_dominance_warning_fires_once(jit, monkeypatch):
    from dreg_jax.penalties import dreg as dreg_module

    monkeypatch.setattr(dreg_module, "_WARNED", [])
    fn = lambda s, d: dreg_jax.dreg_penalty(s, strength=1.0, data_loss=d)
    fn = jax.jit(fn) if jit else fn
    with pytest.warns(UserWarning, match="exceeds the data loss") as record:
        for _ in range(3):
            jax.block_until_ready(fn(jnp.array([2.0, 3.0]), jnp.array(1.0)))
    (warning,) = [w for w in record if "exceeds the data loss" in str(w.message)]
    assert warning.filename == __file__  # the user's line (the lambda above), not the library's or JAX's
    assert "pass scaling='width' or use a smaller strength than 1" in str(warning.message)
    monkeypatch.setattr(dreg_module, "_WARNED", [])
    with pytest.warns(UserWarning, match="you already pass scaling='width': use a smaller strength than 5"):
        jax.block_until_ready(dreg_jax.dreg_penalty(jnp.array([20.0, 30.0]), strength=5.0, widths=(1, 1),
                                                    scaling="width", data_loss=jnp.array(1.0)))
    monkeypatch.setattr(dreg_module, "_WARNED", [])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.block_until_ready(fn(jnp.array([0.1]), jnp.array(1.0)))  # smaller: silent


def test_concrete_constants_inside_jit_are_fine():
    """Data closed over by a jitted step is concrete at trace time: checks must not branch on tracers."""
    model, variables, x, _ = setup_linen("residual_mlp")
    terms = jnp.array([1.0, 2.0])

    @jax.jit
    def step(v):
        out, t = dreg_jax.jacobian_terms(model, v, x, key=jax.random.key(0), layers=["mlp0"])
        return dreg_jax.dreg_penalty(terms) + dreg_jax.dreg_penalty(t)

    assert np.isfinite(float(step(variables)))
