"""How much of the DREG study v3 is compiling: programs, compile seconds, run seconds, wall seconds.

1. The v3 quick profile (`make demo` until the v4 study) twice, each in a fresh process on a fresh output folder: once
   with an empty persistent compilation cache (cold: what a new user waits), once with the cache
   the first run filled (warm). The study prints its own `compiled programs: N, compile seconds:
   S, run seconds: R` line; this script reads it and adds the wall time.
2. The planner's count for every profile, without training: the distinct compiled programs the
   study's runs need (one per program config, class count and data shapes: what
   `dreg_jax.engine.grid.compile_grid` keys its cache on), from the tuning stage's first round
   and the final stage (edge extensions add strengths, not programs). A study's own count can be
   higher: it counts every build, and the engine keeps 8 executables in memory, so a program
   needed again after eviction is built again (loaded from the persistent cache, or recompiled).

    python benchmarks/compile_share.py [--plan-only] [--profiles quick full]

With shape buckets (issue 32) a program is one per regularizer family and bucket: the planner
counts ``(config, class count, bucket)``, or the data's own shapes for an unpadded program.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))


def planned_programs(profile_name: str) -> tuple[int, int]:
    """``(programs, runs)`` the study's planner gives for a profile: the distinct compiled
    programs (program config, class count, bucket or the data's own shapes: what
    `dreg_jax.engine.grid.compile_grid` keys its cache on) over the runs of the tuning stage's
    first round and the final stage (edge extensions add strengths, not programs)."""
    import dreg_study_v3 as study
    from dreg_jax.data import load_dataset
    from dreg_jax.engine.sweep import plan_programs

    profile = study.PROFILES[profile_name]
    specs = []
    for d in profile.datasets:
        for f in profile.fractions:
            tuning = study.draw_dataset(d, f, study.TUNING_DRAW, profile, tuning=True)
            seeds = [study.TUNING_SEED_BASE + i for i in range(profile.tuning_seeds)]
            for a in profile.activations:
                for arm, (kind, _) in study.ARMS.items():
                    strengths = (study.grid(kind, profile) if study.has_strength(arm, a)
                                 else [study.CENTRES[kind]] if kind in study.CENTRES else [None])
                    specs += [study.spec(tuning, a, arm, lr, s, seed, profile)
                              for s in strengths for lr in profile.learning_rates for seed in seeds]
            for seed in range(profile.final_seeds):
                name = study.draw_dataset(d, f, seed, profile, tuning=False)
                for a in profile.activations:
                    for arm, (kind, _) in {**study.ARMS, **study.FIXED_ARMS}.items():
                        strength = study.CENTRES.get(kind) if kind in study.CENTRES else None
                        specs.append(study.spec(name, a, arm, study.FIXED_LEARNING_RATE, strength, seed, profile))
    keys = set()
    for program in plan_programs(specs, study.engine_options(profile), plan_for=study.planning_specs(profile)):
        if program.bucket is None:
            ds = load_dataset(program.runs[0][0][0])
            shapes = tuple(None if a is None else tuple(a.shape) for a in
                           (ds.x_train, ds.x_test, ds.x_val, *sorted(ds.robust.values(), key=lambda v: v.shape)))
        else:
            shapes = tuple(program.bucket)
        keys.add((program.config, program.num_classes, shapes))
    return len(keys), len(specs)


STATS = re.compile(r"compiled programs: (\d+), compile seconds: ([\d.]+), run seconds: ([\d.]+)")


def timed_quick_run(out: pathlib.Path, cache: pathlib.Path, data: pathlib.Path) -> dict:
    env = {**os.environ, "DREG_JAX_CACHE": str(cache), "DREG_JAX_DATA_DIR": str(data)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "dreg_study_v3.py"), "--profile", "quick",
                           "--out", str(out), "--no-progress"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the quick profile failed:\n{done.stderr[-3000:]}")
    programs, compile_s, run_s = STATS.findall(done.stdout)[-1]
    return {"programs": int(programs), "compile_s": float(compile_s), "run_s": float(run_s), "wall_s": wall}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan-only", action="store_true", help="count the planned programs; train nothing")
    parser.add_argument("--profiles", nargs="+", default=["quick", "full"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        os.environ["DREG_JAX_DATA_DIR"] = str(tmp / "data")  # the planner builds the offline sets here
        rows = []
        if not args.plan_only:
            cache = tmp / "cache"
            for label in ("cold (empty cache)", "warm (cache of the cold run)"):
                rows.append((label, timed_quick_run(tmp / f"out-{len(rows)}", cache, tmp / "data")))
        print(f"{'quick profile':<30} {'programs':>9} {'compile s':>10} {'run s':>7} {'wall s':>7} {'compile/wall':>13}")
        for label, r in rows:
            print(f"{label:<30} {r['programs']:>9} {r['compile_s']:>10.1f} {r['run_s']:>7.1f} {r['wall_s']:>7.1f} "
                  f"{r['compile_s'] / r['wall_s']:>13.2f}")
        print(f"\n{'profile (planner, no training)':<30} {'distinct programs':>18} {'runs':>7}")
        for name in args.profiles:
            programs, runs = planned_programs(name)
            print(f"{name:<30} {programs:>18} {runs:>7}")


if __name__ == "__main__":
    main()
