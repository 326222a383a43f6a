"""Seeds as a sequential Python loop vs one vmapped program (the engine's whole-run programs).

For N = 1, 2, 4, 8, 16 seeds (``--seeds``; up to thousands on an accelerator) of a small
model, times three ways to train N runs:

* ``python``: the usual research loop, one Python-dispatched jitted ``train_step`` per
  mini-batch, seed after seed (``dreg_jax.fit``);
* ``scan``: N calls, one after the other, of the compiled single-run program (whole run in one
  ``lax.scan``);
* ``vmap``: one call of the compiled N-run vmapped program.

Same steps per run in all three. Compile time is excluded (every program is compiled and run
once before timing) and printed apart; medians over ``--repeats``. The ``python`` and ``scan``
columns are linear in N by construction: measured up to N = 4 and 16, extrapolated above
(marked ``*``). Prints runs/second and speedups, writes JSON.

Usage: python benchmarks/vmap_seeds.py [--repeats 5] [--epochs 10] [--seeds 1 10 100 1000 4000]
       [--models mnist1d_40-64x2-10] [--out results/vmap_seeds.json]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax

import dreg_jax
from dreg_jax.engine import EngineOptions, RunHParams
from dreg_jax.engine.grid import compile_grid, place
from dreg_jax.data import load_dataset
from dreg_jax.engine.sweep import engine_data

MODELS = {
    # name: (dataset, hidden, batch)
    "tabular_breast_cancer_30-64x3-2": ("breast_cancer", (64, 64, 64), 32),
    "digits_64-128x2-10": ("digits", (128, 128), 64),
    # the DREG study's program shape (MNIST-1D 4000 x 40, ChainzRule 2 x 64 + DREG, batch 64)
    "mnist1d_40-64x2-10": ("mnist1d", (64, 64), 64),
}
MEASURED_PYTHON, MEASURED_SCAN = 4, 16  # above: extrapolated linearly from N = 1


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--regularizer", default="dreg", choices=dreg_jax.REGULARIZERS)
    parser.add_argument("--models", nargs="+", default=list(MODELS)[:2], choices=list(MODELS))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/vmap_seeds.json"))
    args = parser.parse_args(argv)
    options = EngineOptions(per_epoch_diagnostics=False)
    report = {"device": str(jax.devices()[0]), "epochs": args.epochs, "regularizer": args.regularizer,
              "repeats": args.repeats, "models": {}}
    for name in args.models:
        dataset, hidden, batch = MODELS[name]
        data, classes = engine_data(dataset)
        cfg = dreg_jax.TrainConfig(
            model=dreg_jax.ModelConfig(hidden=hidden, activation="chainzrule"),
            regularizer=dreg_jax.RegularizerConfig(kind=args.regularizer), epochs=args.epochs,
            batch_size=batch,
        )
        hp = lambda seeds: RunHParams.stack(
            [RunHParams(seed=s, learning_rate=1e-3, strength=cfg.regularizer.resolved_strength()) for s in seeds])
        single_inputs = [place(hp([s]), data) for s in range(min(max(args.seeds), MEASURED_SCAN))]
        single = compile_grid(cfg, classes, options, *single_inputs[0])
        jax.block_until_ready(single(*single_inputs[0]))
        t_scan_one = timed(lambda: single(*single_inputs[0]), args.repeats)
        ds = load_dataset(dataset)
        fit = lambda seed: dreg_jax.fit(cfg, ds.x_train, ds.y_train, ds.x_test, ds.y_test, seed=seed,
                                        num_classes=classes, progress=False).test["accuracy"]
        fit(0)  # compile the step
        t_python_one = timed(lambda: fit(0), args.repeats)
        rows = []
        print(f"\n{name} ({dataset}, {args.epochs} epochs, {args.regularizer}, {report['device']})")
        print(f"{'N':>5}{'python s':>11}{'scan s':>11}{'vmap s':>10}{'compile s':>11}{'vmap runs/s':>13}"
              f"{'vs python':>11}{'/ N':>6}{'vs scan':>9}{'/ N':>6}")
        for n in args.seeds:
            loop = lambda: [single(*single_inputs[s]) for s in range(n)]
            inputs = place(hp(range(n)), data)
            t0 = time.perf_counter()
            program = compile_grid(cfg, classes, options, *inputs)
            t_compile = time.perf_counter() - t0
            jax.block_until_ready(program(*inputs))
            # the Python loop and the scan calls are linear in N by construction: timed in full
            # up to MEASURED_PYTHON / MEASURED_SCAN runs, extrapolated above
            t_python = (timed(lambda: [fit(s) for s in range(n)], args.repeats) if n <= MEASURED_PYTHON
                        else n * t_python_one)
            t_scan = timed(loop, args.repeats) if n <= MEASURED_SCAN else n * t_scan_one
            t_vmap = timed(lambda: program(*inputs), args.repeats)
            row = {"n": n, "python_s": t_python, "python_extrapolated": n > MEASURED_PYTHON, "scan_s": t_scan,
                   "scan_extrapolated": n > MEASURED_SCAN, "vmap_s": t_vmap, "compile_s": t_compile,
                   "vmap_runs_per_s": n / t_vmap,
                   "speedup_vs_python": t_python / t_vmap, "speedup_vs_scan": t_scan / t_vmap}
            rows.append(row)
            star = lambda flag: "*" if flag else " "  # noqa: E731
            print(f"{n:>5}{t_python:>10.3f}{star(row['python_extrapolated'])}{t_scan:>10.3f}"
                  f"{star(row['scan_extrapolated'])}{t_vmap:>10.3f}{t_compile:>11.2f}{row['vmap_runs_per_s']:>13.2f}"
                  f"{row['speedup_vs_python']:>11.2f}{row['speedup_vs_python'] / n:>6.2f}"
                  f"{row['speedup_vs_scan']:>9.2f}{row['speedup_vs_scan'] / n:>6.2f}")
        report["models"][name] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
