"""Cost of one Adam train step under each regularizer (jit-compiled, CPU/GPU/TPU).

Times the same MLP with: plain, DREG activation scope, DREG layer scope (Rademacher probes),
DREG layer scope (exact closed form for dense layers), IGPen, whole-network Jacobian
penalty, spectral norm, weight decay and gradient-coherent regularization. Methods are
timed in interleaved rounds (round r times every method once) so machine noise hits all of
them alike; the table reports the median ms/step over rounds and the ratio to plain.

If torch is installed, the same DREG layer-scope step written with ``torch.func.jvp`` (and a
plain torch step) is timed in the same rounds and our speedup over it printed.

The transformer rows (``--shapes transformer_...``) train a small pre-LN GELU encoder (a
user linen model, through :func:`dreg_jax.jacobian_terms`): plain; DREG activation scope on
every FFN GELU; probes on the FFN Dense layers (all rows, and row-subsampled); probes on the
whole FFN branch; and the same model and DREG step in torch (``torch.func.jvp``). The
subsampled rows also report the estimator's spread: the relative std of the total penalty
over 64 probe keys at the initial parameters.

The lifted rows (``--shapes lifted_vit_d64x4_s16_b32``) train a ViT-style encoder written as
big_vision writes it, ``nn.scan(nn.remat(block))``, beside the same encoder unrolled: the DREG
step (probes on each block's MLP) over the plain step, for both; and a nested selection (a
block and its first Dense, 16 probes) against the two selections made separately.

Usage: python benchmarks/step_cost.py [--rounds 15] [--steps 20] [--out step_cost.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import pathlib
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dreg_jax

SHAPES = {
    # name: (input features, hidden widths, classes, batch)
    "medium_784-256x4-10": (784, (256, 256, 256, 256), 10, 128),
    "tabular_8-64x3-2": (8, (64, 64, 64), 2, 32),
}
# name: (input features, model width, blocks, heads, sequence, classes, batch)
TRANSFORMERS = {"transformer_d128x4_h4_s64_b32": (32, 128, 4, 4, 64, 10, 32)}
# name: (model width, blocks, heads, sequence, classes, batch)
LIFTED = {"lifted_vit_d64x4_s16_b32": (64, 4, 4, 16, 10, 32)}
TRANSFORMER_METHODS = {
    # name: jacobian_terms keyword arguments (None: the plain step)
    "plain": None,
    "dreg_activation_ffn_gelu": dict(scope="activation"),
    "dreg_probe_ffn_dense": dict(layers=[nn.Dense], row_fraction=1.0, ffn_only=True),
    "dreg_probe_ffn_dense_rows_0.25": dict(layers=[nn.Dense], row_fraction=0.25, ffn_only=True),
    "dreg_probe_ffn_dense_rows_0.125": dict(layers=[nn.Dense], row_fraction=0.125, ffn_only=True),
    "dreg_probe_ffn_block": dict(layers="ffn", row_fraction=1.0),
    "dreg_probe_ffn_block_rows_0.25": dict(layers="ffn", row_fraction=0.25),
}
# name: (model width, blocks, heads, sequence, classes, batch)
LIFTED = {"lifted_vit_d64x4_s16_b32": (64, 4, 4, 16, 10, 32)}
METHODS = {
    "plain": dict(kind="none"),
    "dreg_activation": dict(kind="dreg", dreg_scope="activation"),
    "dreg_layer_probe": dict(kind="dreg", dreg_scope="layer", layer_estimator="probe"),
    "dreg_layer_exact": dict(kind="dreg", dreg_scope="layer", layer_estimator="exact"),
    "igpen": dict(kind="igpen"),
    "jacobian_hoffman": dict(kind="jacobian"),
    "spectral_norm": dict(kind="spectral_norm"),
    "weight_decay": dict(kind="weight_decay"),
    "coherent": dict(kind="coherent"),
}


def jax_stepper(method, shape, activation, mode):
    d_in, hidden, classes, batch = shape
    cfg = dreg_jax.TrainConfig(
        model=dreg_jax.ModelConfig(hidden=hidden, activation=activation),
        regularizer=dreg_jax.RegularizerConfig(**METHODS[method]),
    )
    key = jax.random.key(0)
    data = {"x": jax.random.normal(key, (batch, d_in)), "y": jnp.arange(batch) % classes}
    state = dreg_jax.create_train_state(cfg, key, d_in, classes)
    holder = {"state": state}

    @functools.partial(jax.jit, static_argnums=1)
    def scanned(s, steps):
        def body(carry, k):
            carry, metrics = dreg_jax.train_step(carry, data, k, cfg)
            return carry, metrics["loss"]
        return jax.lax.scan(body, s, jax.random.split(key, steps))

    def run(steps):
        s = holder["state"]
        if mode == "scan":  # all steps in one compiled program (how the engine trains)
            s, losses = scanned(s, steps)
        else:  # one dispatch per jitted step from Python
            for t in range(steps):
                s, losses = dreg_jax.train_step(s, data, jax.random.fold_in(key, t), cfg)
        jax.block_until_ready(losses)
        holder["state"] = s

    return run


def torch_steppers(shape, activation, strength):
    """Plain and DREG layer-scope (torch.func.jvp, one Rademacher probe) Adam steps."""
    import torch
    from torch.func import functional_call, jvp

    d_in, hidden, classes, batch = shape
    torch.manual_seed(0)
    act = {"gelu": torch.nn.GELU(approximate="tanh"), "relu": torch.nn.ReLU(), "tanh": torch.nn.Tanh()}[activation]
    dims = (d_in,) + tuple(hidden)
    blocks = torch.nn.ModuleList(
        [torch.nn.Sequential(torch.nn.Linear(a, b), act) for a, b in zip(dims[:-1], dims[1:])]
    )
    head = torch.nn.Linear(dims[-1], classes)
    params = list(blocks.parameters()) + list(head.parameters())
    x = torch.randn(batch, d_in)
    y = torch.arange(batch) % classes
    ce = torch.nn.CrossEntropyLoss()

    def make(dreg):
        opt = torch.optim.Adam(params, lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            h, penalty = x, 0.0
            for block, width in zip(blocks, hidden):
                if dreg:
                    v = torch.randint(0, 2, h.shape, dtype=h.dtype) * 2 - 1
                    block_params = dict(block.named_parameters())
                    h, jv = jvp(lambda inp: functional_call(block, block_params, (inp,)), (h,), (v,))
                    penalty = penalty + jv.pow(2).sum(1).mean() / width
                else:
                    h = block(h)
            loss = ce(head(h), y) + strength * penalty
            loss.backward()
            opt.step()

        def run(steps):
            for _ in range(steps):
                step()

        return run

    return {"torch_plain": make(False), "torch_dreg_layer_probe": make(True)}, torch.__version__


class FFN(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.d, name="fc2")(dreg_jax.Activation(nn.gelu, name="gelu")(nn.Dense(4 * self.d, name="fc1")(x)))


class EncoderBlock(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(self.heads, name="attn")(nn.LayerNorm(name="ln1")(x))
        return x + FFN(self.d, name="ffn")(nn.LayerNorm(name="ln2")(x))


class Encoder(nn.Module):
    d: int
    blocks: int
    heads: int
    classes: int

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.d, name="embed")(x)
        for i in range(self.blocks):
            x = EncoderBlock(self.d, self.heads, name=f"block{i}")(x)
        return nn.Dense(self.classes, name="head")(nn.LayerNorm(name="ln")(x).mean(axis=1))


def transformer_layers(options, blocks):
    if options.get("ffn_only"):
        return [f"block{i}/ffn/{fc}" for i in range(blocks) for fc in ("fc1", "fc2")]
    if options.get("layers") == "ffn":
        return [f"block{i}/ffn" for i in range(blocks)]
    return None


def transformer_setup(shape):
    d_in, d, blocks, heads, seq, classes, batch = shape
    model = Encoder(d, blocks, heads, classes)
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, seq, d_in))
    y = jnp.arange(batch) % classes
    params = model.init(key, x)["params"]
    return model, params, x, y


def transformer_penalty(model, params, x, key, method, blocks):
    options = TRANSFORMER_METHODS[method]
    kwargs = {k: v for k, v in options.items() if k not in ("layers", "ffn_only")}
    logits, terms = dreg_jax.jacobian_terms(model, {"params": params}, x, key=key,
                                            layers=transformer_layers(options, blocks), **kwargs)
    return logits, dreg_jax.dreg_penalty(terms)


def transformer_stepper(method, shape, mode):
    model, params, x, y = transformer_setup(shape)
    blocks = shape[2]
    tx = optax.adam(1e-3)
    holder = {"carry": (params, tx.init(params))}

    def loss_fn(params, key):
        if TRANSFORMER_METHODS[method] is None:
            logits, penalty = model.apply({"params": params}, x), 0.0
        else:
            logits, penalty = transformer_penalty(model, params, x, key, method, blocks)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + penalty

    def step(carry, key):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = tx.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss

    jit_step = jax.jit(step)

    @functools.partial(jax.jit, static_argnums=1)
    def scanned(carry, steps):
        return jax.lax.scan(step, carry, jax.random.split(jax.random.key(1), steps))

    def run(steps):
        carry = holder["carry"]
        if mode == "scan":
            carry, losses = scanned(carry, steps)
        else:
            for t in range(steps):
                carry, losses = jit_step(carry, jax.random.key(t))
        jax.block_until_ready(losses)
        holder["carry"] = carry

    return run


def transformer_spread(shape, method, keys=64):
    """Relative std of the total penalty over probe keys, at the initial parameters."""
    model, params, x, _ = transformer_setup(shape)
    fn = jax.jit(jax.vmap(lambda k: transformer_penalty(model, params, x, k, method, shape[2])[1]))
    values = np.asarray(fn(jax.random.split(jax.random.key(2), keys)))
    return float(values.std() / values.mean()), float(values.mean())


def torch_transformer_steppers(shape, strength):
    """The same encoder in torch: plain and DREG probes on the FFN Linear layers (torch.func.jvp)."""
    import torch
    from torch.func import functional_call, jvp

    d_in, d, blocks, heads, seq, classes, batch = shape
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
            self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
            self.gelu = torch.nn.GELU(approximate="tanh")

        def forward(self, x, dreg):
            h = self.ln1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            h, penalty = self.ln2(x), 0.0
            for layer, act in ((self.fc1, self.gelu), (self.fc2, None)):
                if dreg:
                    v = torch.randint(0, 2, h.shape, dtype=h.dtype) * 2 - 1
                    h, jv = jvp(lambda inp: functional_call(layer, dict(layer.named_parameters()), (inp,)), (h,), (v,))
                    penalty = penalty + jv.pow(2).sum((1, 2)).mean()
                else:
                    h = layer(h)
                h = act(h) if act is not None else h
            return x + h, penalty

    embed, head, ln = torch.nn.Linear(d_in, d), torch.nn.Linear(d, classes), torch.nn.LayerNorm(d)
    body = torch.nn.ModuleList([Block() for _ in range(blocks)])
    params = [p for m in (embed, head, ln, body) for p in m.parameters()]
    x, y = torch.randn(batch, seq, d_in), torch.arange(batch) % classes
    ce = torch.nn.CrossEntropyLoss()

    def make(dreg):
        opt = torch.optim.Adam(params, lr=1e-3)

        def run(steps):
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                h, penalty = embed(x), 0.0
                for block in body:
                    h, p = block(h, dreg)
                    penalty = penalty + p
                loss = ce(head(ln(h).mean(1)), y) + strength * penalty
                loss.backward()
                opt.step()

        return run

    return {"torch_plain": make(False), "torch_dreg_probe_ffn_dense": make(True)}, torch.__version__


def time_rounds(runners, rounds, steps):
    """Median ms/step of each runner over interleaved rounds in shuffled order."""
    for run in runners.values():  # compile + warm up
        run(steps)
    times = {m: [] for m in runners}
    order, rng = list(runners), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no method always runs first (or right after another)
        for m in order:
            t0 = time.perf_counter()
            runners[m](steps)
            times[m].append(1e3 * (time.perf_counter() - t0) / steps)
    return times


class _LiftedBlock(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x, _):
        d = x.shape[-1]
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
        x = x + nn.Sequential([nn.Dense(4 * d), nn.gelu, nn.Dense(d)], name="mlp")(nn.LayerNorm()(x))
        return x, None


class _LiftedEncoder(nn.Module):
    blocks: int
    heads: int
    classes: int
    scan: bool

    @nn.compact
    def __call__(self, x):
        if self.scan:
            x, _ = nn.scan(nn.remat(_LiftedBlock), variable_axes={"params": 0}, split_rngs={"params": True},
                           length=self.blocks)(self.heads, name="blocks")(x, None)
        else:
            for i in range(self.blocks):
                x, _ = nn.remat(_LiftedBlock)(self.heads, name=f"blocks_{i}")(x, None)
        return nn.Dense(self.classes)(x.mean(axis=1))


def user_stepper(model, x, y, mode, **dreg):
    """An Adam step of a user linen model; ``dreg`` (jacobian_terms options) adds DREG."""
    key = jax.random.key(0)
    params = model.init(key, x)["params"]
    tx = optax.adam(1e-3)

    def loss_fn(p, k):
        if not dreg:
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        logits, terms = dreg_jax.jacobian_terms(model, {"params": p}, x, key=k, **dreg)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss + dreg_jax.dreg_penalty(terms)

    def step(carry, k):
        p, o = carry
        loss, g = jax.value_and_grad(loss_fn)(p, k)
        u, o = tx.update(g, o)
        return (optax.apply_updates(p, u), o), loss

    holder = {"state": (params, tx.init(params))}
    scanned = jax.jit(lambda c, ks: jax.lax.scan(step, c, ks))
    single = jax.jit(step)

    def run(steps):
        keys = jax.random.split(key, steps)
        if mode == "scan":
            holder["state"], losses = scanned(holder["state"], keys)
        else:
            for k in keys:
                holder["state"], losses = single(holder["state"], k)
        jax.block_until_ready(losses)

    return run


def lifted_rows(shape_name, args):
    d, blocks, heads, seq, classes, batch = LIFTED[shape_name]
    x = jax.random.normal(jax.random.key(1), (batch, seq, d))
    y = jnp.arange(batch) % classes
    scanned = _LiftedEncoder(blocks, heads, classes, scan=True)
    unrolled = _LiftedEncoder(blocks, heads, classes, scan=False)
    runners = {
        "scanned_plain": user_stepper(scanned, x, y, args.mode),
        "scanned_dreg_mlp": user_stepper(scanned, x, y, args.mode, layers=["blocks/mlp"]),
        "unrolled_plain": user_stepper(unrolled, x, y, args.mode),
        "unrolled_dreg_mlp": user_stepper(unrolled, x, y, args.mode,
                                          layers=[f"blocks_{i}/mlp" for i in range(blocks)]),
        "nested_block_and_dense_p16": user_stepper(unrolled, x, y, args.mode, num_probes=16,
                                                   layers=["blocks_0/mlp", "blocks_0/Dense_0"]),
        "block_only_p16": user_stepper(unrolled, x, y, args.mode, num_probes=16, layers=["blocks_0/mlp"]),
        "dense_only_p16": user_stepper(unrolled, x, y, args.mode, num_probes=16, layers=["blocks_0/Dense_0"]),
    }
    times = time_rounds(runners, args.rounds, args.steps)
    med = {m: statistics.median(v) for m, v in times.items()}
    base = {"scanned": med["scanned_plain"], "unrolled": med["unrolled_plain"]}
    rows = {m: {"median_ms": med[m], "ratio_to_plain": med[m] / base["scanned" if m.startswith("scanned") else "unrolled"],
                "all_ms": times[m]} for m in runners}
    scanned_ratio = rows["scanned_dreg_mlp"]["ratio_to_plain"]
    unrolled_ratio = rows["unrolled_dreg_mlp"]["ratio_to_plain"]
    # nested vs the two selections made separately: each separate step also pays one plain step
    separate = med["block_only_p16"] + med["dense_only_p16"] - med["unrolled_plain"]
    summary = {"scanned_over_unrolled_dreg_ratio": scanned_ratio / unrolled_ratio,
               "nested_over_separate": med["nested_block_and_dense_p16"] / separate}
    return rows, summary


def transformer_rows(shape_name, args, report):
    shape = TRANSFORMERS[shape_name]
    runners = {m: transformer_stepper(m, shape, args.mode) for m in TRANSFORMER_METHODS}
    if not args.no_torch:
        try:
            torch_runs, report["torch"] = torch_transformer_steppers(shape, dreg_jax.DEFAULT_LAMBDA)
            runners.update(torch_runs)
        except ImportError:
            print("torch not installed: skipping the torch.func.jvp comparison (pip install '.[torch]')")
    times = time_rounds(runners, args.rounds, args.steps)
    med = {m: statistics.median(v) for m, v in times.items()}
    rows = {}
    for m in times:
        base = med["torch_plain"] if m.startswith("torch") else med["plain"]
        rows[m] = {"median_ms": med[m], "ratio_to_plain": med[m] / base, "all_ms": times[m]}
        if TRANSFORMER_METHODS.get(m) is not None and "row_fraction" in TRANSFORMER_METHODS[m]:
            rows[m]["penalty_rel_std"], rows[m]["penalty_mean"] = transformer_spread(shape, m)
    if "torch_dreg_probe_ffn_dense" in med:
        rows["torch_dreg_probe_ffn_dense"]["our_speedup"] = med["torch_dreg_probe_ffn_dense"] / med["dreg_probe_ffn_dense"]
        rows["torch_plain"]["our_speedup"] = med["torch_plain"] / med["plain"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--activation", default="gelu", choices=["gelu", "relu", "tanh"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES) + list(TRANSFORMERS) + list(LIFTED),
                        choices=list(SHAPES) + list(TRANSFORMERS) + list(LIFTED))
    parser.add_argument("--mode", default="scan", choices=["scan", "dispatch"],
                        help="scan: the timed steps run in one jitted lax.scan; dispatch: one "
                             "Python call per jitted step")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/step_cost.json"))
    args = parser.parse_args(argv)

    report = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
              "machine": platform.machine(), "jax": jax.__version__, "activation": args.activation,
              "rounds": args.rounds, "steps_per_round": args.steps, "mode": args.mode, "shapes": {}}
    for shape_name in args.shapes:
        if shape_name in LIFTED:
            rows, summary = lifted_rows(shape_name, args)
            report["shapes"][shape_name] = {**rows, "summary": summary}
            print_rows(shape_name, rows, report, args)
            print(f"scanned DREG ratio / unrolled DREG ratio: {summary['scanned_over_unrolled_dreg_ratio']:.3f} "
                  f"(target within 5%); nested / separate selections (16 probes): "
                  f"{summary['nested_over_separate']:.3f} (target <= 1.1)")
            continue
        if shape_name in TRANSFORMERS:
            rows = report["shapes"][shape_name] = transformer_rows(shape_name, args, report)
            print_rows(shape_name, rows, report, args)
            continue
        shape = SHAPES[shape_name]
        runners = {m: jax_stepper(m, shape, args.activation, args.mode) for m in METHODS}
        if not args.no_torch:
            try:
                torch_runs, torch_version = torch_steppers(shape, args.activation, dreg_jax.DEFAULT_LAMBDA)
                runners.update(torch_runs)
                report["torch"] = torch_version
            except ImportError:
                print("torch not installed: skipping the torch.func.jvp comparison (pip install '.[torch]')")
        times = time_rounds(runners, args.rounds, args.steps)
        med = {m: statistics.median(v) for m, v in times.items()}
        rows = {m: {"median_ms": med[m], "ratio_to_plain": med[m] / med["plain"],
                    "all_ms": times[m]} for m in METHODS}
        rows.update({m: {"median_ms": med[m], "ratio_to_plain": med[m] / med["torch_plain"],
                         "all_ms": times[m]} for m in times if m.startswith("torch")})
        if "torch_dreg_layer_probe" in med:
            rows["torch_dreg_layer_probe"]["our_speedup"] = med["torch_dreg_layer_probe"] / med["dreg_layer_probe"]
            rows["torch_plain"]["our_speedup"] = med["torch_plain"] / med["plain"]
        report["shapes"][shape_name] = rows
        print_rows(shape_name, rows, report, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return report


def print_rows(shape_name, rows, report, args):
    print(f"\n{shape_name} ({args.activation}, {report['device']}, mode {args.mode})")
    print(f"{'method':<34}{'ms/step':>10}{'x plain':>10}   (torch rows: x torch plain)")
    for m, r in rows.items():
        extra = f"   ours {r['our_speedup']:.1f}x faster" if "our_speedup" in r else ""
        if "penalty_rel_std" in r:
            extra += f"   penalty rel. std over probes {r['penalty_rel_std']:.3f}"
        print(f"{m:<34}{r['median_ms']:>10.3f}{r['ratio_to_plain']:>10.2f}{extra}")


if __name__ == "__main__":
    main()
