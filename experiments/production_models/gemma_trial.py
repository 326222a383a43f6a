"""dreg_jax.jacobian_terms on the real gemma 3.3.0 model code (tiny random config), every term
against jax.jacfwd of the submodule alone at the input it received."""
import sys, warnings, traceback
warnings.filterwarnings("ignore")
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from gemma import gm
from gemma.gm.nn import _config, _modules
import dreg_jax
import _trial  # this folder's shared check and table

cfg = _config.TransformerConfig(
    num_embed=128, embed_dim=32, hidden_dim=64, num_heads=2, head_dim=16, num_kv_heads=1,
    final_logit_softcap=30.0, use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
    attention_types=(_modules.AttentionType.LOCAL_SLIDING, _modules.AttentionType.GLOBAL),
    attn_logits_soft_cap=50.0, sliding_window_size=4, transpose_gating_einsum=True)
model = gm.nn.Transformer(config=cfg, tokens="batch.tokens", dtype=jnp.float32)
B, L = 2, 6
tokens = jax.random.randint(jax.random.key(0), (B, L), 1, 128)
params = model.init(jax.random.key(1), tokens)
print("param paths:", sorted(params["params"].keys()))

def references(paths, variables, *args, **kwargs):
    """||J||_F^2/B of each selected submodule alone at the input it received (jacfwd; the model
    run with jax.disable_jit so nn.jit's inputs are concrete)."""
    refs = {}
    def grab(fun, a, k, ctx):
        out = None  # the reference is taken before the call: its inner calls (share_scope) come later
        if ctx.method_name == "__call__" and ctx.module.scope is not None:
            path = "/".join(ctx.module.scope.path)
            if path in paths and path not in refs:
                i = next(i for i, v in enumerate(a) if hasattr(v, "shape") and hasattr(v, "dtype"))
                h = a[i]
                tied = [j for j, v in enumerate(a) if v is h]
                alone = ctx.module.clone(parent=None)
                variables = ctx.module.variables
                if type(ctx.module).__name__ == "FeedForward":  # share_scope'd Einsums: the map by hand
                    p = variables["params"]
                    def ffn(z):
                        gate = jnp.einsum('...F,NHF->...NH', z, p["gating_einsum"])
                        return jnp.einsum('...H,HF->...F', nn.gelu(gate[..., 0, :]) * gate[..., 1, :], p["linear"])
                    jac = jax.jacfwd(ffn)(h)
                    refs[path] = float(jnp.sum(jac * jac) / h.shape[0])
                    return fun(*a, **k)
                def f(z):
                    args = list(a)
                    for j in tied:
                        args[j] = z
                    y = alone.apply(variables, *args, **k)
                    return y[1] if isinstance(y, tuple) else y
                jac = jax.jacfwd(f)(h)
                refs[path] = float(jnp.sum(jac * jac) / h.shape[0])
        return fun(*a, **k)
    with jax.disable_jit(), nn.intercept_methods(grab):
        model.apply(variables, *args, **kwargs)
    return refs

rows = []


def check(name, layers, *args, num_probes=1, row_fraction=1.0, keys=300, **kwargs):
    """``kwargs`` go to the model's call (``cache=``), in the reference and in jacobian_terms."""
    _trial.check(rows, name, layers, lambda: references(set(layers), params, *args, **kwargs), model, params,
                 *args, keys=keys, num_probes=num_probes, row_fraction=row_fraction, **kwargs)


# 1: nn.jit-wrapped __call__, three calls in a row (eager)
try:
    for i in range(3):
        out, terms = dreg_jax.jacobian_terms(model, params, tokens, key=jax.random.key(i), layers=["layer_0/mlp"])
    same = bool(jnp.all(out.logits == model.apply(params, tokens).logits))
    rows.append(("nn.jit 3 calls", "layer_0/mlp", f"{float(terms['layer_0/mlp']):.4g}", "-", f"right (out == apply: {same})"))
except Exception as e:
    rows.append(("nn.jit 3 calls", "layer_0/mlp", "-", "-", f"ERROR {type(e).__name__}: {str(e)[:150]}"))

check("FFN (Einsum, share_scope)", ["layer_0/mlp", "layer_1/mlp"], tokens)
check("attention (GQA, qk norm, soft cap, local)", ["layer_0/attn"], tokens)
check("attention global", ["layer_1/attn"], tokens)
check("block (returns (cache, x))", ["layer_0", "layer_1"], tokens)
check("RMSNorm", ["layer_0/pre_ffw_norm", "final_norm"], tokens)
check("nested block + FFN, row_fraction 0.5", ["layer_0", "layer_0/mlp"], tokens, row_fraction=0.5)
check("FFN 4 probes", ["layer_1/mlp"], tokens, num_probes=4, keys=100)
# decoding with a KV cache: Block and Attention return (cache, x)
cache = model.init_cache(batch_size=B, dtype=jnp.float32, cache_length=L)
check("decode: block with cache", ["layer_0", "layer_1"], tokens, cache=cache)
check("decode: attention with cache", ["layer_0/attn"], tokens, cache=cache)
try:
    w = dreg_jax.term_widths(model, params, tokens, layers=["layer_0", "layer_0/attn"], cache=cache)
    rows.append(("decode widths", "layer_0, layer_0/attn", str(w), f"{L * 32}", "right" if set(w.values()) == {L * 32} else "WRONG"))
except Exception as e:
    rows.append(("decode widths", "-", "-", "-", f"ERROR {type(e).__name__}: {str(e)[:150]}"))
# exact estimator on an Einsum: refused by name
try:
    dreg_jax.jacobian_terms(model, params, tokens, layers=["layer_0/mlp"], estimator="exact")
    rows.append(("exact on FFN", "layer_0/mlp", "-", "-", "WRONG: not refused"))
except ValueError as e:
    rows.append(("exact on FFN", "layer_0/mlp", "-", "-", "refused: " + str(e).split(";")[-1][:120]))
# gradient through the terms, jit
try:
    g = jax.jit(jax.grad(lambda p: sum(dreg_jax.jacobian_terms(model, p, tokens, key=jax.random.key(0),
                                                               layers=["layer_0/mlp", "layer_1/attn"])[1].values())))(params)
    fin = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(g))
    rows.append(("jit(grad) of terms", "layer_0/mlp, layer_1/attn", "-", "-", f"finite: {fin}"))
except Exception as e:
    rows.append(("jit(grad) of terms", "-", "-", "-", f"ERROR {type(e).__name__}: {str(e)[:150]}"))

_trial.print_table(rows, "jacfwd")
