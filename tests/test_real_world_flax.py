"""jacobian_terms on constructs that public Flax codebases use: scanned and rematerialized stacks
(big_vision's ViT encoder style), nnx.scan stacks, nn.SelfAttention, Dense subclasses calling
super(), blocks returning (x, aux), Conv padding modes, train-mode BatchNorm, NNX under jax.jit.

Every reference is independent of the code under test: the submodule alone, at the input it
received (captured by a plain interceptor or recomputed by hand), through ``jax.jacfwd``.
"""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dreg_jax

D, HID, DEPTH = 8, 16, 3


def jac_sq(fn, h):
    """``||J||_F^2 / B`` of ``fn`` on the whole batch ``h`` (row-mixing maps included)."""
    j = jax.jacfwd(fn)(h)
    return float(jnp.sum(j * j) / h.shape[0])


def captured(model, variables, x, *args, **kwargs):
    """First input of every submodule call (per path, in call order)."""
    seen = {}

    def capture(fun, a, k, ctx):
        if ctx.method_name == "__call__" and ctx.module.scope is not None and ctx.module.scope.path:
            seen.setdefault("/".join(ctx.module.scope.path), []).append(a[0] if a else next(iter(k.values())))
        return fun(*a, **k)

    with nn.intercept_methods(capture):
        model.apply(variables, x, *args, **kwargs)
    return seen


def probe_mean(fn, keys):
    """Mean and standard error of a probe term over many keys (one vmapped program)."""
    values = jax.jit(jax.vmap(fn))(keys)
    return float(jnp.mean(values)), float(jnp.std(values) / np.sqrt(len(keys)))


def assert_unbiased(term_of_key, ref, num_keys):
    """The probe term's mean over ``num_keys`` keys lies within 3 standard errors of ``ref``."""
    mean, se = probe_mean(term_of_key, jax.random.split(jax.random.key(3), num_keys))
    assert abs(mean - ref) < 3 * se + 1e-5 * ref, (mean, ref, se)


# --------------------------------------------------------------- a big_vision-style ViT encoder
class MlpBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(HID)(x)
        x = dreg_jax.Activation(nn.gelu)(x)
        return nn.Dense(D)(x)


class Encoder1DBlock(nn.Module):
    """As in big_vision: returns ``(x, aux_dict)``; the second argument is ``deterministic``."""

    @nn.compact
    def __call__(self, x, deterministic=True):
        out = {}
        y = nn.LayerNorm()(x)
        y = out["sa"] = nn.MultiHeadDotProductAttention(num_heads=2)(y, y)
        x = out["+sa"] = x + y
        y = nn.LayerNorm()(x)
        y = out["mlp"] = MlpBlock()(y)
        x = out["+mlp"] = x + y
        return x, out


class Encoder(nn.Module):
    scan: bool = True
    remat: bool = True

    @nn.compact
    def __call__(self, x, deterministic=True):
        if self.scan:
            block = nn.remat(Encoder1DBlock, prevent_cse=False, static_argnums=(2,)) if self.remat else Encoder1DBlock
            x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                           in_axes=nn.broadcast, length=DEPTH)(name="encoderblock")(x, deterministic)
        else:
            for i in range(DEPTH):
                x, _ = Encoder1DBlock(name=f"encoderblock_{i}")(x, deterministic)
        return nn.LayerNorm(name="encoder_norm")(x)


def unstack(params):
    """The scanned encoder's params as the unrolled encoder's."""
    out = {k: v for k, v in params.items() if k != "encoderblock"}
    for i in range(DEPTH):
        out[f"encoderblock_{i}"] = jax.tree_util.tree_map(lambda a: a[i], params["encoderblock"])
    return out


def restack(grads):
    layers = [grads[f"encoderblock_{i}"] for i in range(DEPTH)]
    out = {k: v for k, v in grads.items() if not k.startswith("encoderblock_")}
    out["encoderblock"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)
    return out


@pytest.fixture(scope="module")
def vit():
    x = jax.random.normal(jax.random.key(0), (4, 5, D))
    scanned = Encoder(scan=True)
    params = scanned.init(jax.random.key(1), x)["params"]
    return scanned, Encoder(scan=False), params, unstack(params), x


@pytest.mark.parametrize("remat", [True, False])
def test_scanned_encoder_exact_terms_and_grads_equal_unrolled(vit, remat):
    scanned, unrolled, params, flat, x = vit
    scanned = Encoder(scan=True, remat=remat)
    sel = "encoderblock/MlpBlock_0/Dense_0"

    def loss_scanned(p):
        out, terms = dreg_jax.jacobian_terms(scanned, {"params": p}, x, layers=[sel], estimator="exact")
        return jnp.sum(out) + sum(terms.values()), (out, terms)

    def loss_unrolled(p):
        layers = [f"encoderblock_{i}/MlpBlock_0/Dense_0" for i in range(DEPTH)]
        out, terms = dreg_jax.jacobian_terms(unrolled, {"params": p}, x, layers=layers, estimator="exact")
        return jnp.sum(out) + sum(terms.values()), (out, terms)

    (_, (out_s, terms_s)), g_s = jax.jit(jax.value_and_grad(loss_scanned, has_aux=True))(params)
    (_, (out_u, terms_u)), g_u = jax.jit(jax.value_and_grad(loss_unrolled, has_aux=True))(flat)
    assert list(terms_s) == [f"{sel}#{i}" for i in range(DEPTH)]
    for i in range(DEPTH):
        w = flat[f"encoderblock_{i}"]["MlpBlock_0"]["Dense_0"]["kernel"]
        np.testing.assert_allclose(float(terms_s[f"{sel}#{i}"]), x.shape[1] * float(jnp.sum(w * w)), rtol=1e-5)  # per token
        np.testing.assert_allclose(float(terms_s[f"{sel}#{i}"]),
                                   float(terms_u[f"encoderblock_{i}/MlpBlock_0/Dense_0"]), rtol=1e-5)
    chex.assert_trees_all_close(out_s, out_u, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(out_s, scanned.apply({"params": params}, x), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(g_s, restack(g_u), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # the exact scanned test and the README's scanned training step stay in the default suite
def test_scanned_encoder_probe_terms_are_unbiased_per_layer(vit):
    scanned, unrolled, params, flat, x = vit
    sel = "encoderblock/MlpBlock_0"
    inputs = captured(unrolled, {"params": flat}, x)
    keys = jax.random.split(jax.random.key(3), 300)

    def terms(key):
        _, t = dreg_jax.jacobian_terms(scanned, {"params": params}, x, key=key, layers=[sel], num_probes=2)
        return jnp.stack([t[f"{sel}#{i}"] for i in range(DEPTH)])

    values = jax.jit(jax.vmap(terms))(keys)
    assert not isinstance(values, jax.core.Tracer)
    for i in range(DEPTH):
        p = flat[f"encoderblock_{i}"]["MlpBlock_0"]
        h = inputs[f"encoderblock_{i}/MlpBlock_0"][0]
        ref = jac_sq(lambda z: MlpBlock().apply({"params": p}, z), h)
        mean, se = float(jnp.mean(values[:, i])), float(jnp.std(values[:, i]) / np.sqrt(len(keys)))
        assert abs(mean - ref) < 3 * se + 1e-4 * ref, (i, mean, ref, se)


def test_remat_checkpoint_and_vmap_ensembles():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.checkpoint(MlpBlock)(name="ck")(x)
            ens = nn.vmap(MlpBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=None, out_axes=0, axis_size=2)(name="ens")
            return ens(x).sum(0)

    model = Net()
    x = jax.random.normal(jax.random.key(0), (3, D))
    v = model.init(jax.random.key(1), x)
    out, terms, widths = jax.jit(lambda v: dreg_jax.jacobian_terms(
        model, v, x, layers=["ck/Dense_0", "ens/Dense_0"], estimator="exact", with_widths=True))(v)
    p = v["params"]
    np.testing.assert_allclose(terms["ck/Dense_0"], jnp.sum(p["ck"]["Dense_0"]["kernel"] ** 2), rtol=1e-5)
    for i in range(2):
        np.testing.assert_allclose(terms[f"ens/Dense_0#{i}"], jnp.sum(p["ens"]["Dense_0"]["kernel"][i] ** 2), rtol=1e-5)
    assert widths == {"ck/Dense_0": HID, "ens/Dense_0#0": HID, "ens/Dense_0#1": HID}
    chex.assert_trees_all_close(out, model.apply(v, x), rtol=1e-6, atol=1e-6)  # jit vs eager: float32 rounding apart


def test_transform_that_carries_no_terms_is_refused_by_name():
    class Loop(nn.Module):
        @nn.compact
        def __call__(self, x):
            step = nn.scan(_Step, variable_broadcast="params", split_rngs={"params": False}, length=2)
            return step(name="loop")(x, None)[0]

    model = Loop()
    x = jnp.ones((2, D))
    v = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"\['loop/mlp'\] are called inside a lifted transform.*'dreg_terms': 0"):
        dreg_jax.jacobian_terms(model, v, x, key=jax.random.key(1), layers=["loop/mlp"])


class _Step(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return MlpBlock(name="mlp")(c), None


# --------------------------------------------------------------- NNX scanned stack
class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(D, HID, rngs=rngs)
        self.fc2 = nnx.Linear(HID, D, rngs=rngs)

    def __call__(self, x):
        return x + self.fc2(nnx.gelu(self.fc1(x)))


class NNXStack(nnx.Module):
    def __init__(self, rngs, remat=False):
        @nnx.split_rngs(splits=DEPTH)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NNXBlock(rngs)

        self.blocks = make(rngs)
        self.remat = remat

    def __call__(self, x):
        def body(x, block):
            return block(x)

        if self.remat:
            body = nnx.remat(body)
        return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)


@pytest.mark.parametrize("remat", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_nnx_scan_terms_equal_per_layer_references(remat):
    model = NNXStack(nnx.Rngs(0), remat=remat)
    x = jax.random.normal(jax.random.key(0), (3, D))
    before = nnx.state(model)
    out, terms = dreg_jax.jacobian_terms(model, None, x, layers=["blocks/fc1"], estimator="exact")
    kernels = model.blocks.fc1.kernel[...]
    assert list(terms) == [f"blocks/fc1#{i}" for i in range(DEPTH)]
    for i in range(DEPTH):
        np.testing.assert_allclose(terms[f"blocks/fc1#{i}"], jnp.sum(kernels[i] ** 2), rtol=1e-5)
    chex.assert_trees_all_close(out, model(x), rtol=1e-6)
    chex.assert_trees_all_equal(nnx.state(model), before)  # nothing left behind on the model
    # probes on the whole block, per layer against jacfwd of that layer alone
    keys = jax.random.split(jax.random.key(2), 300)

    def terms_of(m, key):
        t = dreg_jax.jacobian_terms(m, None, x, key=key, layers=["blocks"])[1]
        return jnp.stack([t[f"blocks#{i}"] for i in range(DEPTH)])

    # nnx.scan needs the NNX transforms around it (a raw jax.vmap of nnx.merge fails in flax itself)
    values = nnx.jit(lambda m, k: nnx.vmap(terms_of, in_axes=(None, 0))(m, k))(model, keys)
    h = x
    for i in range(DEPTH):
        layer = jax.tree_util.tree_map(lambda a: a, nnx.merge(*nnx.split(model.blocks)))
        gd, st_ = nnx.split(layer)
        st_i = jax.tree_util.tree_map(lambda a: a[i], st_)
        fn = lambda z, st_i=st_i: nnx.merge(gd, st_i)(z)
        ref = jac_sq(fn, h)
        mean, se = float(jnp.mean(values[:, i])), float(jnp.std(values[:, i]) / np.sqrt(len(keys)))
        assert abs(mean - ref) < 3 * se + 1e-4 * ref, (i, mean, ref, se)
        h = fn(h)


def test_nnx_read_only_under_jax_jit_nnx_jit_and_vmap_over_seeds():
    model = NNXBlock(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, D))
    direct = dreg_jax.jacobian_terms(model, None, x, key=jax.random.key(1), layers=["fc1", "fc2"])[1]
    closed = jax.jit(lambda k: dreg_jax.jacobian_terms(model, None, x, key=k, layers=["fc1", "fc2"])[1])(jax.random.key(1))
    chex.assert_trees_all_close(closed, direct, rtol=1e-6)

    @nnx.jit
    def f(m, k):
        return dreg_jax.jacobian_terms(m, None, x, key=k, layers=["fc1", "fc2"])[1]

    chex.assert_trees_all_close(f(model, jax.random.key(1)), direct, rtol=1e-6)
    keys = jax.random.split(jax.random.key(1), 4)
    per_seed = nnx.vmap(lambda m, k: dreg_jax.jacobian_terms(m, None, x, key=k, layers=["fc1"])[1]["fc1"],
                        in_axes=(None, 0))(model, keys)
    loop = [dreg_jax.jacobian_terms(model, None, x, key=k, layers=["fc1"])[1]["fc1"] for k in keys]
    np.testing.assert_allclose(per_seed, loop, rtol=1e-6)


# --------------------------------------------------------------- self-calling modules
class ScaledDense(nn.Dense):
    """A Dense subclass whose call runs the parent's and scales: its Jacobian is sqrt(3) W."""

    def __call__(self, x):
        return super().__call__(x) * jnp.sqrt(3.0)


class Wrap(nn.Module):
    @nn.compact
    def __call__(self, x):
        return ScaledDense(6, name="scaled")(x)


def test_dense_subclass_calling_super_counts_once_with_the_right_value():
    model = Wrap()
    x = jax.random.normal(jax.random.key(0), (4, 5))
    v = model.init(jax.random.key(1), x)
    w = v["params"]["scaled"]["kernel"]
    true = 3 * float(jnp.sum(w * w))
    with pytest.raises(ValueError, match="ScaledDense.__call__ overrides Dense.__call__"):
        dreg_jax.jacobian_terms(model, v, x, layers=["scaled"], estimator="exact")
    _, terms = jax.jit(lambda k: dreg_jax.jacobian_terms(model, v, x, key=k, layers=["scaled"]))(jax.random.key(2))
    assert list(terms) == ["scaled"]
    assert_unbiased(lambda k: dreg_jax.jacobian_terms(model, v, x, key=k, layers=["scaled"])[1]["scaled"], true, 400)


def test_self_attention_selected_under_jit_matches_jacfwd():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.SelfAttention(num_heads=2, name="sa")(x)

    model = Net()
    x = jax.random.normal(jax.random.key(0), (4, 5, D))
    v = model.init(jax.random.key(1), x)
    _, terms = jax.jit(lambda k: dreg_jax.jacobian_terms(model, v, x, key=k, layers=["sa"]))(jax.random.key(2))
    assert list(terms) == ["sa"]
    ref = jac_sq(lambda z: model.apply(v, z), x)
    assert_unbiased(lambda k: dreg_jax.jacobian_terms(model, v, x, key=k, layers=["sa"], num_probes=4)[1]["sa"], ref, 200)


# --------------------------------------------------------------- multi-output blocks
def test_block_returning_x_and_aux_covers_x_only():
    class AuxBlock(nn.Module):  # big_vision's encoder-block contract: (x, aux dict)
        @nn.compact
        def __call__(self, x):
            y = MlpBlock()(nn.LayerNorm()(x))
            return x + y, {"mlp": y, "+mlp": x + y, "count": jnp.ones(())}

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            y, aux = AuxBlock(name="blk")(x)
            return y + aux["mlp"]

    model = Net()
    x = jax.random.normal(jax.random.key(0), (3, 5, D))
    v = model.init(jax.random.key(1), x)
    sub = lambda z: AuxBlock().apply({"params": v["params"]["blk"]}, z)[0]
    ref = jac_sq(sub, x)
    assert_unbiased(lambda k: dreg_jax.jacobian_terms(model, v, x, key=k, layers=["blk"], num_probes=2)[1]["blk"], ref, 300)
    assert dreg_jax.term_widths(model, v, x, layers=["blk"]) == {"blk": 5 * D}
    widths = jax.jit(lambda k: dreg_jax.jacobian_terms(model, v, x, key=k, layers=["blk"], with_widths=True)[2])
    assert widths(jax.random.key(0)) == {"blk": 5 * D}


# --------------------------------------------------------------- Conv padding modes
CONVS = [
    dict(padding="SAME", kernel_dilation=2, feature_group_count=2),
    pytest.param(dict(padding="VALID", strides=2), marks=pytest.mark.slow),
    pytest.param(dict(padding=((2, 0), (1, 1))), marks=pytest.mark.slow),
    dict(padding=((1, 1), (2, 2)), input_dilation=2),
    dict(padding="REFLECT"),
    dict(padding="CIRCULAR", kernel_dilation=3),
]


@pytest.mark.parametrize("kw", CONVS, ids=[str(c.values[0] if hasattr(c, "marks") else c) for c in CONVS])
def test_conv_padding_modes_exact_or_refused_and_probe_right(kw):
    conv = nn.Conv(4, (3, 3), **kw)
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3), name="conv", **kw)(x)

    model = Net()
    v = model.init(jax.random.key(1), x)
    ref = jac_sq(lambda z: conv.apply({"params": v["params"]["conv"]}, z), x)
    if kw["padding"] in ("REFLECT", "CIRCULAR"):
        with pytest.raises(ValueError, match=f"padding='{kw['padding']}'.*estimator=\"probe\""):
            dreg_jax.jacobian_terms(model, v, x, layers=["conv"], estimator="exact")
    else:
        exact = dreg_jax.jacobian_terms(model, v, x, layers=["conv"], estimator="exact")[1]["conv"]
        np.testing.assert_allclose(float(exact), ref, rtol=1e-5)
        return  # probes on zero-padded convs are checked in test_jacobian_terms
    assert_unbiased(lambda k: dreg_jax.jacobian_terms(model, v, x, key=k, layers=["conv"])[1]["conv"], ref, 200)


# --------------------------------------------------------------- train-mode BatchNorm, row subsampling
class BNBlock(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        y = nn.Dense(6)(x)
        return nn.BatchNorm(use_running_average=not train)(y)


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        return nn.Dense(2)(BNBlock(name="blk")(x, train))


@pytest.mark.parametrize("num_probes", [1, 8])
def test_train_mode_batchnorm_term_is_the_batch_map_for_any_num_probes(num_probes):
    model = BNNet()
    x = jax.random.normal(jax.random.key(0), (6, 4))
    v = model.init(jax.random.key(1), x, train=False)
    blk = {"params": v["params"]["blk"], "batch_stats": v["batch_stats"]["blk"]}
    ref = jac_sq(lambda z: BNBlock().apply(blk, z, True, mutable=["batch_stats"])[0], x)

    def term(k):
        (out, state), t = dreg_jax.jacobian_terms(model, v, x, True, key=k, layers=["blk"], num_probes=num_probes,
                                                  mutable=["batch_stats"])
        return t["blk"]

    assert_unbiased(term, ref, 400)
    (out, state), _ = dreg_jax.jacobian_terms(model, v, x, True, key=jax.random.key(0), layers=["blk"],
                                              num_probes=num_probes, mutable=["batch_stats"])
    ref_out, ref_state = model.apply(v, x, True, mutable=["batch_stats"])
    chex.assert_trees_all_close((out, state), (ref_out, ref_state), rtol=1e-6, atol=1e-7)


class OneBlock(nn.Module):
    """A model whose one submodule is an ``MlpBlock`` (auto-named children) called "blk"."""

    @nn.compact
    def __call__(self, x):
        return MlpBlock(name="blk")(x)


def test_row_fraction_with_auto_named_children():
    model = OneBlock()
    x = jax.random.normal(jax.random.key(0), (8, D))
    v = model.init(jax.random.key(1), x)
    ref = jac_sq(lambda z: MlpBlock().apply({"params": v["params"]["blk"]}, z), x)
    assert_unbiased(lambda k: dreg_jax.jacobian_terms(model, v, x, key=k, layers=["blk"], row_fraction=0.5)[1]["blk"], ref, 400)


# --------------------------------------------------------------- nested selections: linear in probes
def test_nested_selection_costs_linear_in_num_probes():
    model = OneBlock()
    x = jax.random.normal(jax.random.key(0), (32, D))
    v = model.init(jax.random.key(1), x)

    def flops(layers, probes):
        f = jax.jit(lambda k: sum(dreg_jax.jacobian_terms(model, v, x, key=k, layers=layers,
                                                          num_probes=probes)[1].values()))
        return f.lower(jax.random.key(0)).compile().cost_analysis()["flops"]

    for probes in (16, 64):
        nested = flops(["blk", "blk/Dense_0"], probes)
        separate = flops(["blk"], probes) + flops(["blk/Dense_0"], probes)
        assert nested <= 1.1 * separate, (probes, nested, separate)


# --------------------------------------------------------------- property test over module patterns
class SelfCall(nn.Module):
    @nn.compact
    def __call__(self, x):
        return self.twice(x)

    def twice(self, x):
        return jnp.tanh(nn.Dense(x.shape[-1], name="inner")(x))


PATTERNS = ["self_call", "scaled_super", "multi_output", "reflect", "circular", "nested", "scan", "remat",
            # production constructs (issue 34): nn.jit, a custom_vjp inside, (cache, x) outputs,
            # partitioned params, self-attention over one tensor passed twice, keyword inputs
            "jit", "custom_vjp", "cache", "partitioned", "tied", "keyword"]


@jax.custom_vjp
def _clipped_sqrt(x):
    return jnp.sqrt(x)


_clipped_sqrt.defvjp(lambda x: (jnp.sqrt(x), x), lambda x, g: (g / (2.0 * jnp.sqrt(jnp.maximum(x, 1e-6))),))


class _SqrtGate(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1])(x) * _clipped_sqrt(jax.nn.sigmoid(nn.Dense(x.shape[-1])(x)))


class _CacheOut(nn.Module):
    @nn.compact
    def __call__(self, x):
        k = nn.Dense(2 * x.shape[-1])(x)
        return {"k": k, "index": jnp.zeros((x.shape[0],), jnp.int32)}, jnp.tanh(nn.Dense(x.shape[-1])(x))


class _Bilinear(nn.Module):
    @nn.compact
    def __call__(self, q, kv):
        return jnp.tanh(nn.Dense(q.shape[-1])(q)) * nn.Dense(q.shape[-1])(kv)


def _pattern_model(pattern):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            if pattern == "self_call":
                return SelfCall(name="sel")(x)
            if pattern == "scaled_super":
                return ScaledDense(x.shape[-1], name="sel")(x)
            if pattern == "multi_output":
                y, aux = _MultiOut(name="sel")(x)
                return y + aux["z"]
            if pattern in ("reflect", "circular"):
                h = x.reshape(x.shape[0], 2, -1, 1)
                return nn.Conv(1, (1, 3), padding=pattern.upper(), name="sel")(h).reshape(x.shape[0], -1)
            if pattern == "nested":
                return MlpBlock(name="sel")(x)
            if pattern == "jit":
                return nn.jit(MlpBlock)(name="sel")(x)
            if pattern == "custom_vjp":
                return _SqrtGate(name="sel")(x)
            if pattern == "cache":
                return _CacheOut(name="sel")(x)[1]
            if pattern == "partitioned":
                return nn.Dense(x.shape[-1], name="sel", kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
            if pattern == "tied":
                return _Bilinear(name="sel")(x, x)
            if pattern == "keyword":
                return MlpBlock(name="sel")(x=x)
            if pattern == "scan":
                return nn.scan(_Step, variable_axes={"params": 0}, split_rngs={"params": True},
                               length=2)(name="sel")(x, None)[0]
            return nn.remat(MlpBlock)(name="sel")(x)
    return Net()


class _MultiOut(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Dense(x.shape[-1])(x)
        return jnp.sin(y), {"z": y * 2.0, "count": jnp.ones(())}


def _layers(pattern):
    return {"nested": ["sel", "sel/Dense_1"], "scan": ["sel/mlp"]}.get(pattern, ["sel"])


def _reference(model, v, x, path, pattern=None):
    """jacfwd of the submodule at ``path`` alone, at each input it received."""
    if pattern == "jit":  # the same block without nn.jit: its inputs are concrete (the same params)
        model = _pattern_model("nested")
    inputs = captured(model, v, x)
    refs = []
    if path == "sel/mlp":  # the scan's layers: apply each layer's slice
        stacked = v["params"]["sel"]["mlp"]
        h = x
        for i in range(2):
            p = jax.tree_util.tree_map(lambda a: a[i], stacked)
            fn = lambda z, p=p: MlpBlock().apply({"params": p}, z)
            refs.append(jac_sq(fn, h))
            h = fn(h)
        return refs

    h = inputs[path][0]

    def fn(z):  # every argument that is h (a tied self-attention input) becomes z
        out = {}

        def grab(fun, a, k, ctx):
            r = fun(*a, **k)
            if ctx.method_name == "__call__" and "/".join(ctx.module.scope.path) == path and path not in out:
                out[path] = r
            return r

        def swap(fun, a, k, ctx):  # replace the submodule's input by z, keep everything else
            if ctx.method_name == "__call__" and ctx.module.scope is not None and "/".join(ctx.module.scope.path) == path \
                    and "done" not in out:
                out["done"] = True
                first = a[0] if a else next(iter(k.values()))
                return grab(fun, tuple(z if b is first else b for b in a), {n: z if b is first else b for n, b in k.items()}, ctx)
            return fun(*a, **k)

        with nn.intercept_methods(swap):
            model.apply(v, x)
        return out[path][1] if isinstance(out[path], tuple) else out[path]  # (cache, x): x

    jacobian = jax.jacrev if pattern == "custom_vjp" else jax.jacfwd
    refs.append(float(jnp.sum(jacobian(fn)(h) ** 2) / h.shape[0]))
    return refs


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATTERNS), st.sampled_from(["probe", "exact"]), st.sampled_from([1, 3]))
def test_module_patterns_give_the_reference_or_a_clear_error(pattern, estimator, num_probes):
    model = _pattern_model(pattern)
    x = jax.random.normal(jax.random.key(0), (3, D))
    v = model.init(jax.random.key(1), x)
    layers = _layers(pattern)
    try:
        out, terms = jax.jit(lambda k: dreg_jax.jacobian_terms(model, v, x, key=k, layers=layers, estimator=estimator,
                                                               num_probes=num_probes))(jax.random.key(2))
    except ValueError as err:
        assert estimator == "exact" and "no closed form" in str(err), err
        return
    for value in terms.values():
        assert not isinstance(value, jax.core.Tracer) and np.isfinite(float(value))
    chex.assert_trees_all_close(out, model.apply(v, x), rtol=1e-6, atol=1e-6)
    refs = _reference(model, v, x, layers[0], pattern)
    got = [t for k, t in terms.items() if k.split("#")[0] == layers[0]]
    assert len(got) == len(refs)
    if estimator == "exact":
        np.testing.assert_allclose(np.asarray(got, np.float64), refs, rtol=1e-5)
        return
    keys = jax.random.split(jax.random.key(5), 200)
    values = jax.jit(jax.vmap(lambda k: jnp.stack(
        [t for key, t in dreg_jax.jacobian_terms(model, v, x, key=k, layers=layers, num_probes=num_probes)[1].items()
         if key.split("#")[0] == layers[0]])))(keys)
    for i, ref in enumerate(refs):
        mean, se = float(jnp.mean(values[:, i])), float(jnp.std(values[:, i]) / np.sqrt(len(keys)))
        assert abs(mean - ref) < 3 * se + 1e-5 * ref, (pattern, i, mean, ref, se)


PRODUCTION_PATTERNS = PATTERNS[PATTERNS.index("jit"):]


@pytest.mark.parametrize("estimator", ["probe", "exact"])
@pytest.mark.parametrize("pattern", PRODUCTION_PATTERNS)
def test_every_production_pattern_gives_the_reference_or_a_clear_error(pattern, estimator):
    """The property test above samples 6 of its cases; these constructs run every time."""
    test_module_patterns_give_the_reference_or_a_clear_error.hypothesis.inner_test(pattern, estimator, 1)


def test_nnx_vmap_ensemble_gives_one_term_per_member():
    class Member(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc(x)

    class Ensemble(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=2)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Member(rngs)

            self.members = make(rngs)

        def __call__(self, x):
            return nnx.vmap(lambda m, x: m(x), in_axes=(0, None), out_axes=0)(self.members, x).mean(0)

    model = Ensemble(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (5, 4))
    out, terms = dreg_jax.jacobian_terms(model, None, x, layers=["members/fc"], estimator="exact")
    kernels = model.members.fc.kernel[...]
    assert list(terms) == ["members/fc#0", "members/fc#1"]
    np.testing.assert_allclose([terms["members/fc#0"], terms["members/fc#1"]],
                               [jnp.sum(kernels[0] ** 2), jnp.sum(kernels[1] ** 2)], rtol=1e-5)
    chex.assert_trees_all_close(out, model(x), rtol=1e-6)


@pytest.mark.parametrize("estimator", ["probe", "exact"])
def test_capture_intermediates_gives_what_apply_gives(estimator):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(6, name="h")(x)
            return ScaledDense(3, name="scaled")(nn.gelu(h))  # a selected module calling super()

    model = Net()
    x = jax.random.normal(jax.random.key(0), (3, 5))
    v = model.init(jax.random.key(1), x)
    layers = ["h", "scaled"] if estimator == "probe" else ["h"]
    out, _ = dreg_jax.jacobian_terms(model, v, x, key=jax.random.key(2), layers=layers, estimator=estimator,
                                     capture_intermediates=True)
    chex.assert_trees_all_close(out, model.apply(v, x, capture_intermediates=True), rtol=1e-6)
