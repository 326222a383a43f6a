"""jacobian_terms on production model code, written the way public Flax LLM libraries write it:
a transformer whose ``__call__`` is ``nn.jit``-wrapped (Gemma), a gated recurrent block with a
``custom_vjp`` square root inside ``nn.scan`` (Griffin's RG-LRU), a decoding block returning
``(cache, x)``, Dense layers with logical partitioning, self-attention written ``attn(y, y)``,
Einsum layers that take the equation first, nested selections with ``row_fraction``.

Every reference is independent of the code under test: the submodule alone, at the input it
received, through ``jax.jacfwd`` (``jax.jacrev`` where a ``custom_vjp`` forbids forward mode).
"""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dreg_jax
from dreg_jax.penalties.probes import rademacher

B, T, D = 3, 4, 8


def jac_sq(fn, h, jac=jax.jacfwd):
    """``||J||_F^2 / B`` of ``fn`` on the whole batch ``h``."""
    j = jac(fn)(h)
    return float(jnp.sum(j * j) / h.shape[0])


def assert_unbiased(term_of_key, ref, num_keys=300):
    """The probe term's mean over ``num_keys`` keys lies within 3 standard errors of ``ref``
    (``term_of_key`` may return a vector of terms and ``ref`` a list: one program for all)."""
    values = jax.jit(jax.vmap(term_of_key))(jax.random.split(jax.random.key(3), num_keys))
    values = np.asarray(values, np.float64).reshape(num_keys, -1)
    for got, want in zip(values.T, np.atleast_1d(ref), strict=True):
        mean, se = got.mean(), got.std() / np.sqrt(num_keys)
        assert abs(mean - want) < 3 * se + 1e-5 * abs(want), (mean, want, se)


def inputs_of(model, variables, x, path, *args, **kwargs):
    """Arguments of every call of ``path`` (a plain interceptor; a fresh mutable collection so an
    ``nn.jit`` inside traces again instead of replaying a cached program)."""
    seen = []

    def capture(fun, a, k, ctx):
        if ctx.method_name == "__call__" and ctx.module.scope is not None and "/".join(ctx.module.scope.path) == path:
            seen.append((a, k))
        return fun(*a, **k)

    with nn.intercept_methods(capture):
        model.apply(variables, x, *args, mutable=[f"ref{id(seen)}"], **kwargs)
    return seen


# --------------------------------------------------------------- Gemma-style: nn.jit, Einsum(eqn, x)
class Einsum(nn.Module):
    """Gemma's einsum layer: the equation is the first argument."""
    shape: tuple

    @nn.compact
    def __call__(self, eqn, x):
        w = self.param("w", nn.initializers.normal(0.3), self.shape)
        return jnp.einsum(eqn, x, w)


class FeedForward(nn.Module):
    @nn.compact
    def __call__(self, x):
        gate = Einsum((2, D, 16), name="gating")("...d,gdf->...gf", x)
        hidden = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
        return Einsum((16, D), name="linear")("...f,fd->...d", hidden)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.RMSNorm(name="pre_ffw_norm")(x)
        return x + FeedForward(name="mlp")(y)


class PlainTransformer(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        for i in range(2):
            x = Block(name=f"layer_{i}")(x)
        return x


class JitTransformer(PlainTransformer):
    """A transformer whose ``__call__`` is ``nn.jit``-wrapped, as Gemma's is."""

    @functools.partial(nn.jit, static_argnames=("train",))
    @nn.compact
    def __call__(self, x, train=False):
        for i in range(2):
            x = Block(name=f"layer_{i}")(x)
        return x


def built(model):
    """``(model, variables, x)`` on a random ``(B, T, D)`` batch."""
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    return model, model.init(jax.random.key(1), x), x


@pytest.fixture(scope="module")
def jitted():
    return built(JitTransformer())


def test_nn_jit_model_gives_each_pass_its_own_terms(jitted):
    model, v, x = jitted
    layers = ["layer_0/mlp", "layer_1/mlp/linear"]
    got = []
    for i in range(3):  # the second call used to fail: nn.jit replayed the first pass's program
        out, terms = dreg_jax.jacobian_terms(model, v, x, key=jax.random.key(i), layers=layers)
        chex.assert_trees_all_close(out, model.apply(v, x), rtol=1e-6, atol=1e-6)
        assert list(terms) == layers
        got.append([float(t) for t in terms.values()])
    assert len({tuple(g) for g in got}) == 3  # each pass draws its own probes
    assert dreg_jax.term_widths(model, v, x, layers=layers) == {"layer_0/mlp": T * D, "layer_1/mlp/linear": T * D}
    # and inside the user's jitted step, traced once, over many keys: unbiased for both
    for path in layers:
        (a, k), = inputs_of(PlainTransformer(), v, x, path)  # concrete inputs: the same model unjitted
        sub = FeedForward() if path.endswith("mlp") else Einsum((16, D))
        params = v["params"]["layer_0"]["mlp"] if path.endswith("mlp") else v["params"]["layer_1"]["mlp"]["linear"]
        ref = jac_sq(lambda z: sub.apply({"params": params}, *(a[:-1] + (z,))), a[-1])
        assert_unbiased(lambda key: dreg_jax.jacobian_terms(model, v, x, key=key, layers=[path])[1][path], ref)


def test_einsum_taking_the_equation_first_and_exact_refusals_name_the_calls(jitted):
    model, v, x = jitted
    path = "layer_0/mlp/gating"
    (a, _), = inputs_of(PlainTransformer(), v, x, path)
    gating = Einsum((2, D, 16))
    ref = jac_sq(lambda z: gating.apply({"params": v["params"]["layer_0"]["mlp"]["gating"]}, a[0], z), a[1])
    assert_unbiased(lambda key: dreg_jax.jacobian_terms(model, v, x, key=key, layers=[path])[1][path], ref)
    with pytest.raises(ValueError, match=r"'layer_0/mlp/gating' \(Einsum\).*calls no submodule"):
        dreg_jax.jacobian_terms(model, v, x, layers=[path], estimator="exact")
    with pytest.raises(ValueError, match=r"'layer_0/mlp' \(FeedForward\).*calls it made were: \[Einsum, Einsum\]"):
        dreg_jax.jacobian_terms(model, v, x, layers=["layer_0/mlp"], estimator="exact")

    class Tokens(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Embed(16, D, name="embed")(ids)

    tokens = Tokens()
    ids = jnp.zeros((B, T), jnp.int32)
    with pytest.raises(TypeError, match=r"'embed' receives a int32 array .*token ids\? select the submodules after"):
        dreg_jax.jacobian_terms(tokens, tokens.init(jax.random.key(0), ids), ids, key=jax.random.key(0), layers=["embed"])


# --------------------------------------------------------------- Griffin-style: custom_vjp sqrt in nn.scan
@jax.custom_vjp
def sqrt_bound_derivative(x):
    """Griffin's square root whose gradient is clipped near 0 (a custom_vjp)."""
    return jnp.sqrt(x)


def _sqrt_fwd(x):
    return jnp.sqrt(x), x


def _sqrt_bwd(x, g):
    return (g / (2.0 * jnp.sqrt(jnp.maximum(x, 1.0 / 1000.0 ** 2))),)


sqrt_bound_derivative.defvjp(_sqrt_fwd, _sqrt_bwd)


class RGLRU(nn.Module):
    """A real-gated linear recurrence over time with a ``custom_vjp`` square root."""

    @nn.compact
    def __call__(self, x):
        gate_x = jax.nn.sigmoid(nn.Dense(D, name="input_gate")(x))
        log_a = -8.0 * jax.nn.sigmoid(nn.Dense(D, name="a_gate")(x)) * jax.nn.softplus(
            self.param("a_param", nn.initializers.constant(0.5), (D,)))
        a = jnp.exp(log_a)
        normalized = gate_x * x * sqrt_bound_derivative(1.0 - jnp.exp(2.0 * log_a))

        def step(h, inputs):
            a_t, x_t = inputs
            h = a_t * h + x_t
            return h, h

        _, hs = jax.lax.scan(step, jnp.zeros((x.shape[0], D)), (jnp.swapaxes(a, 0, 1), jnp.swapaxes(normalized, 0, 1)))
        return jnp.swapaxes(hs, 0, 1)


class RecurrentBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        y = nn.Dense(D, name="linear_x")(x)
        y = RGLRU(name="rg_lru")(x=y)  # by keyword, as recurrentgemma calls its RG-LRU
        return x + nn.Dense(D, name="linear_out")(y * jax.nn.gelu(nn.Dense(D, name="linear_y")(x))), None


class Griffin(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(RecurrentBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return stack(name="blocks")(x, None)[0]


@pytest.fixture(scope="module")
def griffin():
    return built(Griffin())


def test_custom_vjp_block_in_nn_scan_gets_unbiased_reverse_mode_terms(griffin):
    model, v, x = griffin
    with pytest.raises(ValueError, match=r"'blocks/rg_lru' calls a jax.custom_vjp function.*sqrt_bound_derivative.*mode=\"reverse\""):
        dreg_jax.jacobian_terms(model, v, x, key=jax.random.key(0), layers=["blocks/rg_lru"], mode="forward")
    out, terms = dreg_jax.jacobian_terms(model, v, x, key=jax.random.key(0), layers=["blocks/rg_lru", "blocks/linear_out"])
    chex.assert_trees_all_close(out, model.apply(v, x), rtol=1e-6, atol=1e-6)
    assert sorted(terms) == sorted(["blocks/rg_lru#0", "blocks/rg_lru#1", "blocks/linear_out#0", "blocks/linear_out#1"])
    # references: each layer's RG-LRU alone at the input it received, through jax.jacrev
    refs, h = [], x
    for i in range(2):
        p = jax.tree_util.tree_map(lambda a: a[i], v["params"]["blocks"])
        block = RecurrentBlock()
        (_, k), = inputs_of(block, {"params": p}, h, "rg_lru", None)
        refs.append(jac_sq(lambda z: RGLRU().apply({"params": p["rg_lru"]}, z), k["x"], jax.jacrev))
        h = block.apply({"params": p}, h, None)[0]
    for mode in ("auto", "reverse"):
        assert_unbiased(lambda key: jnp.stack(list(dreg_jax.jacobian_terms(
            model, v, x, key=key, layers=["blocks/rg_lru"], mode=mode)[1].values())), refs)


def test_reverse_mode_gradients_equal_a_hand_written_vjp_reference():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(RGLRU(name="rg_lru")(x))

    model = Net()
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    v = model.init(jax.random.key(1), x)
    key = jax.random.key(7)

    def ours(params):
        return dreg_jax.jacobian_terms(model, {"params": params}, x, key=key, layers=["rg_lru"], num_probes=2)[1]["rg_lru"]

    def hand(params):  # the documented draw: u ~ rademacher(fold_in(call_key(key, 0), 0), (P, *y.shape))
        f = lambda z: RGLRU().apply({"params": params["rg_lru"]}, z)
        y, vjp_fn = jax.vjp(f, x)
        u = rademacher(jax.random.fold_in(dreg_jax.call_key(key, 0), 0), (2,) + y.shape, y.dtype)
        g = jax.vmap(lambda ui: vjp_fn(ui)[0])(u)
        return jnp.mean(jnp.sum(g.reshape(2, B, -1) ** 2, axis=-1))

    chex.assert_trees_all_close(ours(v["params"]), hand(v["params"]), rtol=1e-5)
    g_ours, g_hand = jax.jit(jax.grad(ours))(v["params"]), jax.grad(hand)(v["params"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(g_ours))
    chex.assert_trees_all_close(g_ours, g_hand, rtol=1e-4, atol=1e-6)
    # forward mode on a map without custom_vjp: the same term in expectation, another draw
    plain = dreg_jax.jacobian_terms(model, v, x, key=key, layers=["Dense_0"], mode="reverse")[1]["Dense_0"]
    assert np.isfinite(float(plain))


# --------------------------------------------------------------- decoding caches: which output a term covers
class DecodeBlock(nn.Module):
    """Returns ``(cache, x)`` in decode mode (Gemma's attention block layout)."""
    cache_like_x: bool = False

    @nn.compact
    def __call__(self, x, decode=True):
        k = nn.Dense(D if self.cache_like_x else 2 * D, name="k")(x)
        out = x + nn.Dense(D, name="o")(jnp.tanh(nn.Dense(D, name="q")(x)) * jnp.tanh(k[..., :D]))
        if not decode:
            return None, out
        if not self.cache_like_x:
            k = k.reshape(k.shape[:-1] + (2, D))  # (B, T, heads, dim): not laid out like x
        return {"k": k, "end_index": jnp.full((x.shape[0],), T, jnp.int32)}, out


class Decoder(nn.Module):
    cache_like_x: bool = False

    @nn.compact
    def __call__(self, x, decode=True):
        cache, y = DecodeBlock(self.cache_like_x, name="block")(x, decode)
        return y, cache


@pytest.mark.parametrize("decode", [True, False])
def test_decode_block_term_covers_the_hidden_state_never_the_cache(decode):
    model = Decoder()
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    v = model.init(jax.random.key(1), x)
    ref = jac_sq(lambda z: DecodeBlock().apply({"params": v["params"]["block"]}, z, decode)[1], x)
    for output in (None, "1", {"block": lambda out: out[1]}):
        assert_unbiased(lambda key: dreg_jax.jacobian_terms(model, v, x, decode, key=key, layers=["block"],
                                                            output=output)[1]["block"], ref)
    assert dreg_jax.term_widths(model, v, x, decode, layers=["block"]) == {"block": T * D}


def test_ambiguous_multi_output_is_refused_and_output_selects():
    model = Decoder(cache_like_x=True)
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    v = model.init(jax.random.key(1), x)
    with pytest.raises(ValueError, match=r"'block' returns several floating arrays \(out\[0\]\['k'\] \(3, 4, 8\), "
                                         r"out\[1\] \(3, 4, 8\)\).*pass output="):
        dreg_jax.jacobian_terms(model, v, x, key=jax.random.key(0), layers=["block"])
    ref = jac_sq(lambda z: DecodeBlock(True).apply({"params": v["params"]["block"]}, z)[1], x)
    assert_unbiased(lambda key: dreg_jax.jacobian_terms(model, v, x, key=key, layers=["block"],
                                                        output="1", num_probes=2)[1]["block"], ref)
    ref_k = jac_sq(lambda z: DecodeBlock(True).apply({"params": v["params"]["block"]}, z)[0]["k"], x)
    assert_unbiased(lambda key: dreg_jax.jacobian_terms(model, v, x, key=key, layers=["block"], output="0/k",
                                                        mode="reverse")[1]["block"], ref_k)
    with pytest.raises(ValueError, match=r"output='2' selects nothing in the output of 'block'"):
        dreg_jax.jacobian_terms(model, v, x, key=jax.random.key(0), layers=["block"], output="2")
    with pytest.raises(ValueError, match=r"output='0/end_index'.*|covers is int32"):
        dreg_jax.jacobian_terms(model, v, x, key=jax.random.key(0), layers=["block"], output="0/end_index")
    with pytest.raises(ValueError, match=r"output= names \['blok'\]"):
        dreg_jax.jacobian_terms(model, v, x, key=jax.random.key(0), layers=["block"], output={"blok": "1", "block": "1"})
    with pytest.raises(TypeError, match="output= takes a path"):
        dreg_jax.jacobian_terms(model, v, x, key=jax.random.key(0), layers=["block"], output=1.5)


# --------------------------------------------------------------- partitioned params
def test_logically_partitioned_and_partitioned_params_work_with_every_estimator():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(16, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                         bias_init=nn.with_logical_partitioning(nn.initializers.normal(0.1), ("mlp",)), name="up")(x)
            h = dreg_jax.Activation(nn.gelu, name="act")(h)
            return nn.Dense(D, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")),
                            name="down")(h)

    class Wrapped(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Net(name="net")(x)

    model = Wrapped()
    x = jax.random.normal(jax.random.key(0), (B, D))
    v = model.init(jax.random.key(1), x)
    assert isinstance(v["params"]["net"]["up"]["kernel"], nn.LogicallyPartitioned)
    plain = nn.meta.unbox(v["params"])["net"]
    _, exact = dreg_jax.jacobian_terms(model, v, x, layers=["net/up", "net/down"], estimator="exact")
    np.testing.assert_allclose(float(exact["net/up"]), float(jnp.sum(plain["up"]["kernel"] ** 2)), rtol=1e-6)
    np.testing.assert_allclose(float(exact["net/down"]), float(jnp.sum(plain["down"]["kernel"] ** 2)), rtol=1e-6)
    _, act = dreg_jax.jacobian_terms(model, v, x, scope="activation")
    h = x @ plain["up"]["kernel"] + plain["up"]["bias"]
    np.testing.assert_allclose(float(act["net/act"]), float(jnp.mean(jnp.sum(jax.vmap(jax.vmap(jax.grad(nn.gelu)))(h) ** 2, -1))),
                               rtol=1e-5)
    assert_unbiased(lambda key: dreg_jax.jacobian_terms(model, v, x, key=key, layers=["net/up"], row_fraction=0.5)[1]["net/up"],
                    float(exact["net/up"]))

    class NNXNet(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(D, 16, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "mlp")),
                                 rngs=rngs)

        def __call__(self, x):
            return self.up(x)

    mesh = jax.make_mesh((1,), ("mlp",), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        nnx_model = NNXNet(nnx.Rngs(0))
        _, terms = dreg_jax.jacobian_terms(nnx_model, None, x, layers=["up"], estimator="exact")
        ref = float(jnp.sum(nnx_model.up.kernel[...] ** 2))
        np.testing.assert_allclose(float(terms["up"]), ref, rtol=1e-6)
        assert_unbiased(lambda key: dreg_jax.jacobian_terms(nnx_model, None, x, key=key, layers=["up"])[1]["up"], ref, 100)


# --------------------------------------------------------------- self-attention over one tensor twice
class Attn(nn.Module):
    form: str

    @nn.compact
    def __call__(self, y):
        attn = nn.MultiHeadDotProductAttention(num_heads=2, name="attn")
        return {"one": lambda: attn(y), "two": lambda: attn(y, y), "kv": lambda: attn(y, inputs_kv=y)}[self.form]()


def test_self_attention_as_attn_y_y_is_the_map_of_y():
    y = jax.random.normal(jax.random.key(0), (2, 3, D))
    models = {form: Attn(form) for form in ("one", "two", "kv")}
    params = models["one"].init(jax.random.key(1), y)
    core = nn.MultiHeadDotProductAttention(num_heads=2)
    p = {"params": params["params"]["attn"]}
    ref_self = jac_sq(lambda z: core.apply(p, z, z), y)
    ref_query = jac_sq(lambda z: core.apply(p, z, y), y)
    key = jax.random.key(4)
    terms = {form: float(dreg_jax.jacobian_terms(m, params, y, key=key, layers=["attn"])[1]["attn"])
             for form, m in models.items()}
    assert terms["one"] == pytest.approx(terms["two"], rel=1e-5) and terms["one"] == pytest.approx(terms["kv"], rel=1e-5)
    assert_unbiased(lambda k: dreg_jax.jacobian_terms(models["two"], params, y, key=k, layers=["attn"])[1]["attn"], ref_self)
    assert_unbiased(lambda k: dreg_jax.jacobian_terms(models["two"], params, y, key=k, layers=["attn"],
                                                      tie_inputs=False)[1]["attn"], ref_query)
    # NNX: the same rule
    attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, decode=False, rngs=nnx.Rngs(0))

    class NNXSelf(nnx.Module):
        def __init__(self):
            self.attn = attn

        def __call__(self, y):
            return self.attn(y, y)

    nnx_ref = jac_sq(lambda z: attn(z, z), y)
    nnx_model = NNXSelf()
    assert_unbiased(lambda k: dreg_jax.jacobian_terms(nnx_model, None, y, key=k, layers=["attn"])[1]["attn"], nnx_ref)


# --------------------------------------------------------------- nested selections with row_fraction; scan keys
class Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, name="inner")(jnp.tanh(nn.Dense(D, name="pre")(x)))


class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Inner(name="blk")(x)


def test_nested_selections_with_row_fraction_are_unbiased():
    model = Outer()
    x = jax.random.normal(jax.random.key(0), (6, D))
    v = model.init(jax.random.key(1), x)
    p = v["params"]["blk"]
    ref_blk = jac_sq(lambda z: Inner().apply({"params": p}, z), x)
    (a, _), = inputs_of(model, v, x, "blk/inner")
    ref_inner = jac_sq(lambda z: nn.Dense(D).apply({"params": p["inner"]}, z), a[0])
    for path, ref in (("blk", ref_blk), ("blk/inner", ref_inner)):
        assert_unbiased(lambda k: dreg_jax.jacobian_terms(model, v, x, key=k, layers=["blk", "blk/inner"],
                                                          row_fraction=0.5)[1][path], ref)


class MaskedBlock(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        return jnp.tanh(nn.Dense(D)(x)) * mask[:, :, None]


class MaskedModel(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        return MaskedBlock(name="blk")(x, mask)


def test_row_fraction_takes_per_example_arguments_at_the_same_rows():
    model = MaskedModel()
    x = jax.random.normal(jax.random.key(0), (6, T, D))
    mask = (jax.random.uniform(jax.random.key(1), (6, T)) > 0.3).astype(jnp.float32)
    v = model.init(jax.random.key(2), x, mask)
    ref = jac_sq(lambda z: MaskedBlock().apply({"params": v["params"]["blk"]}, z, mask), x)
    assert_unbiased(lambda k: dreg_jax.jacobian_terms(model, v, x, mask, key=k, layers=["blk"], row_fraction=0.5)[1]["blk"],
                    ref)


class ScanStep(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(D, name="mlp")(jnp.tanh(x)), None


def test_scan_terms_draw_from_call_key_0_as_documented():
    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.scan(ScanStep, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="s")(x, None)[0]

    model = Scanned()
    x = jax.random.normal(jax.random.key(0), (B, D))
    v = model.init(jax.random.key(1), x)
    key = jax.random.key(9)
    _, terms = dreg_jax.jacobian_terms(model, v, x, key=key, layers=["s/mlp"])
    p0 = jax.tree_util.tree_map(lambda a: a[0], v["params"]["s"]["mlp"])
    probe = rademacher(jax.random.fold_in(dreg_jax.call_key(key, 0), 0), (1,) + x.shape, x.dtype)[0]
    _, jv = jax.jvp(lambda z: nn.Dense(D).apply({"params": p0}, z), (jnp.tanh(x),), (probe,))
    np.testing.assert_allclose(float(terms["s/mlp#0"]), float(jnp.mean(jnp.sum(jv ** 2, -1))), rtol=1e-5)


def test_nnx_custom_vjp_takes_reverse_mode_and_bad_modes_are_refused():
    class Gate(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(D, D, rngs=rngs), nnx.Linear(D, D, rngs=rngs)

        def __call__(self, x):
            return self.a(x) * sqrt_bound_derivative(jax.nn.sigmoid(self.b(x)))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.gate = Gate(rngs)

        def __call__(self, x):
            return self.gate(x)

    model = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (B, D))
    ref = jac_sq(lambda z: model.gate(z), x, jax.jacrev)
    assert_unbiased(lambda k: dreg_jax.jacobian_terms(model, None, x, key=k, layers=["gate"])[1]["gate"], ref)
    with pytest.raises(ValueError, match=r"'gate' calls a jax.custom_vjp function \(sqrt_bound_derivative\)"):
        dreg_jax.jacobian_terms(model, None, x, key=jax.random.key(0), layers=["gate"], mode="forward")
    with pytest.raises(ValueError, match=r"mode=\"reverse\" chooses how the probe estimator differentiates"):
        dreg_jax.jacobian_terms(model, None, x, layers=["gate/a"], estimator="exact", mode="reverse")
    with pytest.raises(ValueError, match="mode"):
        dreg_jax.jacobian_terms(model, None, x, key=jax.random.key(0), layers=["gate"], mode="backward")
