"""Cost of one Adam train step under each regularizer (jit-compiled, CPU/GPU/TPU).

Times the same MLP with: plain, DREG activation scope, DREG layer scope (Rademacher probes),
DREG layer scope (exact closed form for dense layers), IGPen, whole-network Jacobian
penalty, spectral norm, weight decay and gradient-coherent regularization. Methods are
timed in interleaved rounds (round r times every method once) so machine noise hits all of
them alike; the table reports the median ms/step over rounds and the ratio to plain.

If torch is installed, the same DREG layer-scope step written with ``torch.func.jvp`` (and a
plain torch step) is timed in the same rounds and our speedup over it printed.

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

import jax
import jax.numpy as jnp

import dreg_jax

SHAPES = {
    # name: (input features, hidden widths, classes, batch)
    "medium_784-256x4-10": (784, (256, 256, 256, 256), 10, 128),
    "tabular_8-64x3-2": (8, (64, 64, 64), 2, 32),
}
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--activation", default="gelu", choices=["gelu", "relu", "tanh"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
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
        shape = SHAPES[shape_name]
        runners = {m: jax_stepper(m, shape, args.activation, args.mode) for m in METHODS}
        if not args.no_torch:
            try:
                torch_runs, torch_version = torch_steppers(shape, args.activation, dreg_jax.DEFAULT_LAMBDA)
                runners.update(torch_runs)
                report["torch"] = torch_version
            except ImportError:
                print("torch not installed: skipping the torch.func.jvp comparison (pip install '.[torch]')")
        for run in runners.values():  # compile + warm up
            run(args.steps)
        times = {m: [] for m in runners}
        order, rng = list(runners), random.Random(0)
        for _ in range(args.rounds):
            rng.shuffle(order)  # no method always runs first (or right after another)
            for m in order:
                t0 = time.perf_counter()
                runners[m](args.steps)
                times[m].append(1e3 * (time.perf_counter() - t0) / args.steps)
        med = {m: statistics.median(v) for m, v in times.items()}
        rows = {m: {"median_ms": med[m], "ratio_to_plain": med[m] / med["plain"],
                    "all_ms": times[m]} for m in METHODS}
        rows.update({m: {"median_ms": med[m], "ratio_to_plain": med[m] / med["torch_plain"],
                         "all_ms": times[m]} for m in times if m.startswith("torch")})
        if "torch_dreg_layer_probe" in med:
            rows["torch_dreg_layer_probe"]["our_speedup"] = med["torch_dreg_layer_probe"] / med["dreg_layer_probe"]
            rows["torch_plain"]["our_speedup"] = med["torch_plain"] / med["plain"]
        report["shapes"][shape_name] = rows
        print(f"\n{shape_name} (batch {shape[3]}, {args.activation}, {report['device']}, mode {args.mode})")
        print(f"{'method':<24}{'ms/step':>10}{'x plain':>10}   (torch rows: x torch plain)")
        for m, r in rows.items():
            extra = f"   ours {r['our_speedup']:.1f}x faster" if "our_speedup" in r else ""
            print(f"{m:<24}{r['median_ms']:>10.3f}{r['ratio_to_plain']:>10.2f}{extra}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
