"""jacobian_terms on 8 CPU devices, against one device (run by tests/test_many_devices.py in a
process of its own: the device count is fixed when JAX starts). Prints one JSON object.

* ``jit`` with the batch sharded, on a classic (Auto) mesh and on Explicit axes
  (``jax.make_mesh``'s default): probes (``row_fraction`` 1 and 0.5) and exact, terms and
  gradients against the unsharded call;
* ``shard_map`` + ``pmean`` with ``check_vma`` True (axes found by JAX) and False
  (``axis_name="data"``): the exact estimator's terms and gradients against the unsharded call;
  the probe estimator's mean over keys against the exact value (unbiasedness), and whether the
  shards drew different probes;
* a block with BatchNorm synced over the axis (``axis_name="data"``), under ``shard_map``:
  the probe estimate's mean against the block's exact term, ``||J||_F^2 / B`` of the global
  batch map (``jax.jacfwd`` of the unsharded block).
"""
import json
import os

# 8 CPU devices; the suite's fast-compile level (tests/conftest.py), which this process sets itself
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from dreg_jax import jacobian_terms  # noqa: E402

KEYS = 200


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="d1")(nn.gelu(nn.Dense(16, name="d0")(x)))


class Block(nn.Module):
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=False, axis_name=self.axis_name, name="bn")(nn.Dense(8, name="d")(x))
        return nn.gelu(h)


class BNNet(nn.Module):
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(Block(self.axis_name, name="block")(x))


def max_diff(a, b):
    return float(max(jnp.max(jnp.abs(u - v)) for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))))


def main():
    out = {}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 5)), jnp.float32)
    model = MLP()
    variables = model.init(jax.random.key(0), x)
    key = jax.random.key(1)

    def penalty(v, x, key, estimator="probe", row_fraction=1.0, axis_name=None):
        _, terms = jacobian_terms(model, v, x, key=key, layers=["d0", "d1"], estimator=estimator,
                                  row_fraction=row_fraction, axis_name=axis_name)
        return sum(terms.values()), terms

    value = lambda *a, **k: penalty(*a, **k)[0]  # noqa: E731
    classic = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    for estimator, fraction in (("probe", 1.0), ("probe", 0.5), ("exact", 1.0)):
        name = f"{estimator}-{fraction}"
        ref_terms = penalty(variables, x, key, estimator, fraction)[1]
        ref_grad = jax.grad(value)(variables, x, key, estimator, fraction)
        xs = jax.device_put(x, NamedSharding(classic, P("data")))
        f = jax.jit(lambda v, x, k: penalty(v, x, k, estimator, fraction))
        g = jax.jit(jax.grad(lambda v, x, k: value(v, x, k, estimator, fraction)))
        out[f"jit classic {name}"] = (max_diff(f(variables, xs, key)[1], ref_terms), max_diff(g(variables, xs, key), ref_grad))
        with jax.set_mesh(explicit):
            xe = jax.device_put(x, NamedSharding(explicit, P("data")))
            out[f"jit explicit {name}"] = (max_diff(f(variables, xe, key)[1], ref_terms),
                                           max_diff(g(variables, xe, key), ref_grad))

    xs = jax.device_put(x, NamedSharding(classic, P("data")))
    exact_total = float(value(variables, x, key, "exact"))
    out["exact"] = exact_total
    for check in (True, False):
        axis = None if check else "data"

        def sharded(fn):
            return jax.jit(jax.shard_map(fn, mesh=classic, in_specs=(P(), P("data"), P()), out_specs=P(), check_vma=check))

        exact = sharded(lambda v, x, k: jax.lax.pmean(value(v, x, k, "exact", axis_name=axis), "data"))
        exact_grad = sharded(lambda v, x, k: jax.lax.pmean(jax.grad(value)(v, x, k, "exact", axis_name=axis), "data"))
        out[f"shard_map {check} exact"] = (abs(float(exact(variables, xs, key)) - exact_total),
                                          max_diff(exact_grad(variables, xs, key), jax.grad(value)(variables, x, key, "exact")))
        for fraction in (1.0, 0.5):
            per_key = sharded(lambda v, x, k: jax.lax.pmean(value(v, x, k, "probe", fraction, axis), "data"))
            draws = np.asarray([float(per_key(variables, xs, jax.random.key(i))) for i in range(KEYS)])
            out[f"shard_map {check} probe-{fraction}"] = (float(draws.mean()), float(draws.std(ddof=1) / np.sqrt(KEYS)))
        # the shards' own estimates differ (their probes differ)
        spread = jax.jit(jax.shard_map(lambda v, x, k: value(v, x, k, "probe", 1.0, axis)[None], mesh=classic,
                                       in_specs=(P(), P("data"), P()), out_specs=P("data"), check_vma=check))
        out[f"shard_map {check} distinct shard estimates"] = len(set(np.asarray(spread(variables, xs, key)).round(6).tolist()))

    # BatchNorm synced over the axis, the block selected: unbiased for the global batch map
    net, synced = BNNet(), BNNet("data")
    bn_vars = net.init(jax.random.key(2), x)
    block_vars = {"params": bn_vars["params"]["block"], "batch_stats": bn_vars["batch_stats"]["block"]}
    batch_map = lambda z: Block().apply(block_vars, z, mutable=["batch_stats"])[0]  # noqa: E731
    jac = jax.jacfwd(batch_map)(x)  # (B, 8, B, 5): the whole batch's map
    out["bn exact"] = float(jnp.sum(jac ** 2) / x.shape[0])

    def bn_term(v, x, k):
        (_, terms) = jacobian_terms(synced, v, x, key=k, layers=["block"], mutable=["batch_stats"])[:2]
        return jax.lax.pmean(terms["block"], "data")

    f = jax.jit(jax.shard_map(bn_term, mesh=classic, in_specs=(P(), P("data"), P()), out_specs=P()))
    draws = np.asarray([float(f(bn_vars, xs, jax.random.key(i))) for i in range(KEYS)])
    out["bn shard_map probe"] = (float(draws.mean()), float(draws.std(ddof=1) / np.sqrt(KEYS)))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
