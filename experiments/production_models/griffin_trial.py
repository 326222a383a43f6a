"""dreg_jax.jacobian_terms on the real recurrentgemma 1.0.1 Griffin code (tiny random config):
RG-LRU with a custom_vjp square root, Conv1D, local attention; references by jax.jacrev of the
submodule alone at the input it received."""
import warnings
warnings.filterwarnings("ignore")
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
import recurrentgemma.jax as rg
from recurrentgemma import common
import dreg_jax
import _trial  # this folder's shared check and table

cfg = common.GriffinConfig(vocab_size=128, width=32, mlp_expanded_width=64, num_heads=2,
                           block_types=(common.TemporalBlockType.RECURRENT, common.TemporalBlockType.ATTENTION),
                           embeddings_scale_by_sqrt_dim=True, attention_window_size=4, logits_soft_cap=30.0,
                           lru_width=32, scan_type=common.ScanType.LINEAR_NATIVE)
import sys
REMAT = sys.argv[1:] != ["plain"]
model = rg.Griffin(cfg, dtype=jnp.float32, param_dtype=jnp.float32, gradient_checkpointing=REMAT)
ref_model = rg.Griffin(cfg, dtype=jnp.float32, param_dtype=jnp.float32, gradient_checkpointing=False)
B, L = 2, 6
tokens = jax.random.randint(jax.random.key(0), (B, L), 1, 128)
pos = jnp.broadcast_to(jnp.arange(L), (B, L))
params = model.init(jax.random.key(1), tokens, pos)
print("param paths:", jax.tree_util.tree_map(lambda a: a.shape, params["params"]).keys())

def references(paths, *args, **kwargs):
    refs = {}
    def grab(fun, a, k, ctx):
        if ctx.method_name == "__call__" and ctx.module.scope is not None:
            path = "/".join(ctx.module.scope.path)
            if path in paths and path not in refs:
                if a:
                    i = next(i for i, v in enumerate(a) if hasattr(v, "shape") and hasattr(v, "dtype"))
                    h = a[i]
                else:  # called by keyword (rg_lru(x=x, ...)): the first is the input
                    i = next(iter(k)); h = k[i]
                alone, variables = ctx.module.clone(parent=None), ctx.module.variables
                def f(z):
                    args, kw = list(a), dict(k)
                    if isinstance(i, int):
                        args[i] = z
                    else:
                        kw[i] = z
                    y = alone.apply(variables, *args, **kw)
                    return y[0] if isinstance(y, tuple) else y
                jac = jax.jacrev(f)(h)
                refs[path] = float(jnp.sum(jac * jac) / h.shape[0])
        return fun(*a, **k)
    with nn.intercept_methods(grab):
        ref_model.apply(params, *args, **kwargs)
    return refs

rows = []


def check(name, layers, *args, keys=300, **kw):
    _trial.check(rows, name, layers, lambda: references(set(layers), *args), model, params, *args, keys=keys, **kw)


check("RG-LRU (custom_vjp sqrt), auto", ["blocks.0/recurrent_block/rg_lru"], tokens, pos)
check("RG-LRU, mode=reverse", ["blocks.0/recurrent_block/rg_lru"], tokens, pos, mode="reverse")
check("recurrent block (contains RG-LRU)", ["blocks.0/recurrent_block"], tokens, pos)
check("residual block (returns (x, cache))", ["blocks.0", "blocks.1"], tokens, pos)
check("Conv1D", ["blocks.0/recurrent_block/conv_1d"], tokens, pos)
check("MLP blocks", ["blocks.0/mlp_block", "blocks.1/mlp_block"], tokens, pos)
check("local attention", ["blocks.1/attention_block"], tokens, pos)
check("nested: recurrent block + RG-LRU, 2 probes", ["blocks.0/recurrent_block", "blocks.0/recurrent_block/rg_lru"], tokens, pos, num_probes=2, keys=150)
check("RG-LRU, row_fraction 0.5", ["blocks.0/recurrent_block/rg_lru"], tokens, pos, row_fraction=0.5)
try:
    dreg_jax.jacobian_terms(model, params, tokens, pos, key=jax.random.key(0), layers=["blocks.0/recurrent_block/rg_lru"], mode="forward")
    rows.append(("mode=forward on RG-LRU", "-", "-", "-", "WRONG: not refused"))
except ValueError as e:
    rows.append(("mode=forward on RG-LRU", "blocks.0/recurrent_block/rg_lru", "-", "-", "refused: " + str(e)[:160]))
try:
    g = jax.jit(jax.grad(lambda p: sum(dreg_jax.jacobian_terms(model, p, tokens, pos, key=jax.random.key(0),
                                                               layers=["blocks.0/recurrent_block", "blocks.1/mlp_block"])[1].values())))(params)
    fin = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(g))
    rows.append(("jit(grad) of terms", "blocks.0/recurrent_block, blocks.1/mlp_block", "-", "-", f"finite: {fin}"))
except Exception as e:
    rows.append(("jit(grad) of terms", "-", "-", "-", f"ERROR {type(e).__name__}: {str(e)[:200]}"))
print("gradient_checkpointing (nn.remat) =", REMAT)
_trial.print_table(rows, "jacrev")
