"""The DREG study's throughput under each program grouping, side by side on this backend.

Runs a slice of ``experiments/dreg_study.py``'s grid once per grouping (``EngineOptions.fold``:
``none`` = one program per activation x regularizer, the layout before folding; ``auto`` = the
backend's cost model; ``all`` = everything foldable), each in a fresh process with the
persistent compilation cache off (cold compiles), and prints wall seconds, runs/s, the number
of compiled programs, compile and run seconds, the speedup over ``none``, and the largest
difference of any run's test accuracy from the ``none`` run (0: grouping does not change
results).

Usage:
  python benchmarks/study_throughput.py [--profile quick|full] [--datasets pima mnist1d]
      [--folds none auto all] [--out results/study_throughput.json]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
sys.path.insert(0, {experiments!r})
from _common import fast_compile_flags
fast_compile_flags()
import dataclasses
import jax
from dreg_study import PROFILES
from dreg_jax.engine import EngineOptions, run_sweep
from dreg_jax.engine.grid import CompileStats
sweep = PROFILES[{profile!r}]
if {datasets!r}:
    sweep = dataclasses.replace(sweep, datasets=tuple({datasets!r}))
specs = sweep.expand()
stats = CompileStats()
t0 = time.perf_counter()
records = run_sweep(specs, {results!r}, progress=False, stats=stats,
                    options=EngineOptions(per_epoch_diagnostics=False, fold={fold!r}))
wall = time.perf_counter() - t0
print("RESULT " + json.dumps({{"wall_s": wall, "runs": len(records), "programs": stats.programs,
    "compile_s": stats.compile_seconds, "run_s": stats.run_seconds, "device": str(jax.devices()[0]),
    "accuracy": {{r["run_id"]: r["metrics"].get("test_accuracy") for r in records}}}}))
"""


def run_child(profile, datasets, fold, workdir):
    code = _CHILD.format(experiments=str(ROOT / "experiments"), profile=profile, datasets=list(datasets or ()),
                         results=str(workdir / f"{fold}.jsonl"), fold=fold)
    env = {**os.environ, "DREG_JAX_COMPILATION_CACHE": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        sys.stderr.write(out.stdout + out.stderr)
        raise SystemExit(f"the {fold} run failed (exit {out.returncode})")
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick", choices=("tiny", "quick", "full"))
    parser.add_argument("--datasets", nargs="*", default=None, help="a slice of the profile's datasets")
    parser.add_argument("--folds", nargs="+", default=["none", "auto"], choices=("none", "auto", "all"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/study_throughput.json"))
    args = parser.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fold in args.folds:
            t0 = time.perf_counter()
            rows[fold] = run_child(args.profile, args.datasets, fold, pathlib.Path(tmp))
            rows[fold]["process_wall_s"] = time.perf_counter() - t0
    base = rows[args.folds[0]]
    print(f"\nDREG study, profile {args.profile}{' on ' + ', '.join(args.datasets) if args.datasets else ''}: "
          f"{base['runs']} runs on {base['device']} (cold compiles)")
    header = (f"{'fold':<6}{'programs':>9}{'compile s':>11}{'run s':>9}{'wall s':>9}{'runs/s':>9}"
              f"{'speedup':>9}{'max |d acc|':>13}")
    print(header + "\n" + "-" * len(header))
    for fold, r in rows.items():
        diff = max(abs((r["accuracy"][k] or 0) - (base["accuracy"][k] or 0)) for k in base["accuracy"])
        r["speedup_vs_" + args.folds[0]] = base["wall_s"] / r["wall_s"]
        r["max_accuracy_difference"] = diff
        print(f"{fold:<6}{r['programs']:>9}{r['compile_s']:>11.1f}{r['run_s']:>9.1f}{r['wall_s']:>9.1f}"
              f"{r['runs'] / r['wall_s']:>9.2f}{base['wall_s'] / r['wall_s']:>9.2f}{diff:>13.2g}")
    for r in rows.values():
        del r["accuracy"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"profile": args.profile, "datasets": args.datasets, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
