"""What reverse-mode DREG terms cost (``jacobian_terms(..., mode="reverse")``), against forward mode.

A Griffin-style model (gated recurrent blocks whose RG-LRU calls a ``jax.custom_vjp`` square
root, then an MLP per block; tiny, random weights) trains with Adam under jit:

- ``plain``: no penalty;
- ``mlp_forward`` / ``mlp_reverse``: one probe on every block's MLP, forward vs reverse mode
  (the same term: the ratio of the two is the price of reverse mode on one map);
- ``recurrent_auto``: one probe on every recurrent block (its custom_vjp makes ``mode="auto"``
  take reverse mode; forward mode is impossible there).

Methods are timed in interleaved rounds (every method once per round) and the table gives the
median ms/step and the ratio to ``plain``. It also prints each mode's spread on the MLP term:
the relative standard deviation over 256 probe keys at the initial weights (the two modes have
different variances: forward ``2(||J^T J||_F^2 - sum diag^2)``, reverse
``2(||J J^T||_F^2 - sum diag^2)`` per probe).

    python benchmarks/reverse_mode_cost.py [--rounds 9] [--steps 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import dreg_jax

WIDTH, SEQ, BATCH, BLOCKS = 64, 32, 16, 2


@jax.custom_vjp
def sqrt_bound_derivative(x):
    return jnp.sqrt(x)


sqrt_bound_derivative.defvjp(lambda x: (jnp.sqrt(x), x),
                             lambda x, g: (g / (2.0 * jnp.sqrt(jnp.maximum(x, 1e-6))),))


class RGLRU(nn.Module):
    @nn.compact
    def __call__(self, x):
        gate = jax.nn.sigmoid(nn.Dense(WIDTH, name="input_gate")(x))
        log_a = -8.0 * jax.nn.sigmoid(nn.Dense(WIDTH, name="a_gate")(x))
        a = jnp.exp(log_a)
        u = gate * x * sqrt_bound_derivative(1.0 - jnp.exp(2.0 * log_a))
        _, hs = jax.lax.scan(lambda h, au: (au[0] * h + au[1],) * 2, jnp.zeros((x.shape[0], WIDTH)),
                             (jnp.swapaxes(a, 0, 1), jnp.swapaxes(u, 0, 1)))
        return jnp.swapaxes(hs, 0, 1)


class Recurrent(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(WIDTH)(RGLRU(name="rg_lru")(nn.Dense(WIDTH)(x)) * nn.gelu(nn.Dense(WIDTH)(x)))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(WIDTH)(nn.gelu(nn.Dense(4 * WIDTH)(x)))


class Griffin(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(BLOCKS):
            x = x + Recurrent(name=f"recurrent_{i}")(nn.RMSNorm()(x))
            x = x + MLP(name=f"mlp_{i}")(nn.RMSNorm()(x))
        return nn.Dense(2)(x.mean(1))


MLPS = [f"mlp_{i}" for i in range(BLOCKS)]
METHODS = {
    "plain": None,
    "mlp_forward": dict(layers=MLPS, mode="forward"),
    "mlp_reverse": dict(layers=MLPS, mode="reverse"),
    "recurrent_auto": dict(layers=[f"recurrent_{i}" for i in range(BLOCKS)]),
}


def make_step(model, tx, options):
    def loss_fn(params, x, y, key):
        if options is None:
            out, penalty = model.apply({"params": params}, x), 0.0
        else:
            out, terms = dreg_jax.jacobian_terms(model, {"params": params}, x, key=key, **options)
            penalty = 1e-3 * sum(terms.values())
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean() + penalty

    @jax.jit
    def step(params, opt_state, x, y, key):
        grads = jax.grad(loss_fn)(params, x, y, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    model = Griffin()
    x = jax.random.normal(jax.random.key(0), (BATCH, SEQ, WIDTH))
    y = jax.random.randint(jax.random.key(1), (BATCH,), 0, 2)
    params = model.init(jax.random.key(2), x)["params"]
    tx = optax.adam(1e-3)
    steps = {name: make_step(model, tx, options) for name, options in METHODS.items()}
    state = {name: (params, tx.init(params)) for name in METHODS}
    for name, step in steps.items():  # compile
        jax.block_until_ready(step(*state[name], x, y, jax.random.key(0)))
    times = {name: [] for name in METHODS}
    for r in range(args.rounds):
        for name, step in steps.items():
            p, o = state[name]
            start = time.perf_counter()
            for s in range(args.steps):
                p, o = step(p, o, x, y, jax.random.key(r * args.steps + s))
            jax.block_until_ready(p)
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    base = statistics.median(times["plain"])
    print(f"device: {jax.devices()[0].device_kind}; batch {BATCH} x {SEQ} x {WIDTH}, {BLOCKS} blocks, "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'method':<16} {'ms/step':>9} {'x plain':>8}")
    for name in METHODS:
        median = statistics.median(times[name])
        print(f"{name:<16} {median:9.2f} {median / base:8.2f}")
    print(f"reverse / forward on the same MLP terms: "
          f"{statistics.median(times['mlp_reverse']) / statistics.median(times['mlp_forward']):.2f}")
    keys = jax.random.split(jax.random.key(9), 256)
    for mode in ("forward", "reverse"):
        values = jax.jit(jax.vmap(lambda k: dreg_jax.jacobian_terms(
            model, {"params": params}, x, key=k, layers=["mlp_0"], mode=mode)[1]["mlp_0"]))(keys)
        print(f"spread of the mlp_0 term, {mode}: mean {float(values.mean()):.4g}, "
              f"relative std {float(values.std() / values.mean()):.3f}")


if __name__ == "__main__":
    main()
