"""DREG study v4: how many datasets, sized by a simulation of power from v3's observed spreads.

Written before any v4 run (issue 36: "the number of datasets chosen by a simulation of power").
It reads only the committed v3 raw results (``docs/results/dreg_study_v3_full``) and draws
synthetic studies; it trains nothing.

What is estimated from v3 (learnable datasets, final seeds), for each primary comparison:

* the between-dataset spread ``tau``: the standard deviation over datasets of the per-dataset
  mean difference (its seed noise subtracted: ``tau^2 = var(d_j) - mean(s_j^2 / S)``);
* the within-dataset seed spread ``sigma``: the pooled standard deviation over seeds of one
  dataset's per-seed differences.

The primary comparisons (pre-registered for v4, ``docs/preregistration_v4.md``):

* P1: DREG-layer - none, clean test accuracy, mean over the dataset's (activation, fraction) cells;
* P2: DREG-act - none under GELU only (under ReLU the penalty has no gradient, issue 36).

A simulated study draws ``n`` datasets with true effects ``delta_j ~ delta + tau * e_j``
(``e_j`` standard normal, or Student t with 3 degrees of freedom scaled to unit variance as a
heavy-tailed check), observes each as ``delta_j + sigma * z_j / sqrt(S)`` over ``S`` final seeds,
and calls the comparison SUPPORTED when the exact one-sided Wilcoxon signed-rank p over the
``n`` per-dataset means passes Holm over the 2 primary comparisons (the smaller of two
independent ones at ``alpha / 2``: the conservative first step) and the 95% t-interval over
datasets lies above 0. Power is the share of SUPPORTED studies at ``delta = 0.5`` pp.

Usage: python experiments/dreg_study_v4_power.py [--draws 2000] [--out docs/results/dreg_study_v4_power]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
from scipy import stats

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

V3 = ROOT / "docs" / "results" / "dreg_study_v3_full"
DATASETS = (15, 20, 24, 30, 36, 40, 48, 60, 72, 84, 96, 120)
SEEDS = 5  # final seeds per dataset in v4 (v3: 10); the seed noise enters as sigma / sqrt(SEEDS)
EFFECT = 0.5  # pp: the smallest gain worth a default (v3's equivalence margin)
ALPHA = 0.05
PRIMARY = 2  # Holm family of the primary comparisons
TARGET = 0.80


def v3_spreads() -> dict:
    """``{comparison: {"tau", "sigma", "datasets", "mean"}}`` from v3's committed raw results."""
    from _common import load_raw_results
    from dreg_study_v3_analysis import accuracy_table, learnable, per_dataset

    meta = json.loads((V3 / "meta.json").read_text())
    records = load_raw_results(V3)
    learn = learnable(meta)
    datasets = sorted(d for d, (ok, _, _) in learn.items() if ok)
    seeds = sorted({r["study"]["seed"] for r in records})
    profile = meta["design"]
    cells = [(f, a) for f in profile["fractions"] for a in profile["activations"]]
    gelu = [(f, "gelu") for f in profile["fractions"]]
    clean = accuracy_table(records)
    out = {}
    for name, arm, chosen in (("P1 DREG-layer - none", "DREG-layer", cells), ("P2 DREG-act - none (GELU)", "DREG-act", gelu)):
        effects = per_dataset(clean, arm, "none", datasets, seeds, chosen)
        means = np.array([np.mean(v) for v in effects.values()])
        within = np.array([np.var(v, ddof=1) for v in effects.values()])
        seeds_per = np.array([len(v) for v in effects.values()])
        sigma = float(np.sqrt(np.mean(within)))
        tau2 = float(np.var(means, ddof=1) - np.mean(within / seeds_per))
        out[name] = {"tau": float(np.sqrt(max(tau2, 0.0))), "sigma": sigma, "datasets": len(means),
                     "mean": float(np.mean(means)), "sd_of_dataset_means": float(np.std(means, ddof=1)),
                     "seeds": int(np.median(seeds_per))}
    return out


def _unit_t3(rng, shape):
    return rng.standard_t(3, size=shape) / np.sqrt(3.0)  # Student t, 3 df, unit variance


def power(n: int, tau: float, sigma: float, delta: float, draws: int, rng, heavy: bool = False,
          seeds: int = SEEDS, alpha: float = ALPHA / PRIMARY) -> float:
    """Share of simulated studies of ``n`` datasets (``seeds`` final seeds each) whose comparison
    is SUPPORTED: one-sided signed-rank p <= ``alpha`` and the t-interval above 0. The v4
    analysis calls it at its observed spreads (achieved power)."""
    e = _unit_t3(rng, (draws, n)) if heavy else rng.standard_normal((draws, n))
    observed = delta + tau * e + sigma / np.sqrt(seeds) * rng.standard_normal((draws, n))
    p = stats.wilcoxon(observed, alternative="greater", axis=1, method="exact" if n <= 50 else "approx").pvalue
    mean = observed.mean(1)
    half = stats.t.ppf(0.975, n - 1) * observed.std(1, ddof=1) / np.sqrt(n)
    supported = (p <= alpha) & (mean - half > 0)
    return float(np.mean(supported))


def simulate(spreads: dict, draws: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    table = {}
    for name, s in spreads.items():
        rows = []
        for n in DATASETS:
            rows.append({"datasets": n,
                         "power": power(n, s["tau"], s["sigma"], EFFECT, draws, rng),
                         "power_heavy_tails": power(n, s["tau"], s["sigma"], EFFECT, draws, rng, heavy=True),
                         "power_at_null": power(n, s["tau"], s["sigma"], 0.0, draws, rng)})
        table[name] = rows
    return table


def needed(table: dict) -> int:
    """The fewest datasets of the grid giving every primary comparison TARGET power (normal and
    heavy-tailed dataset effects alike)."""
    for n in DATASETS:
        if all(next(r for r in rows if r["datasets"] == n)["power"] >= TARGET
               and next(r for r in rows if r["datasets"] == n)["power_heavy_tails"] >= TARGET
               for rows in table.values()):
            return n
    return max(DATASETS)


def report(spreads: dict, table: dict, draws: int) -> str:
    lines = ["# DREG study v4: power simulation (before any v4 run)", "",
             f"`python experiments/dreg_study_v4_power.py --draws {draws}`: reads the committed v3 raw results "
             "(`docs/results/dreg_study_v3_full`), trains nothing. Method in the script's docstring.", "",
             "## Spreads observed in v3 (learnable datasets, final seeds, pp)", "",
             "| comparison | datasets | mean | sd of dataset means | tau (between datasets) | sigma (seeds) |",
             "|---|---|---|---|---|---|"]
    for name, s in spreads.items():
        lines.append(f"| {name} | {s['datasets']} | {s['mean']:+.2f} | {s['sd_of_dataset_means']:.2f} | "
                     f"{s['tau']:.2f} | {s['sigma']:.2f} |")
    lines += ["", f"## Power for a true gain of {EFFECT} pp ({SEEDS} seeds per dataset, Holm over {PRIMARY}, "
              f"{draws} simulated studies per cell)", ""]
    for name, rows in table.items():
        lines += [f"**{name}**", "", "| datasets | power | power, t(3) dataset effects | false SUPPORTED at 0 |",
                  "|---|---|---|---|"]
        lines += [f"| {r['datasets']} | {100 * r['power']:.1f}% | {100 * r['power_heavy_tails']:.1f}% | "
                  f"{100 * r['power_at_null']:.1f}% |" for r in rows]
        lines.append("")
    n = needed(table)
    lines += [f"Monte Carlo standard error of a power near 80%: {100 * np.sqrt(0.8 * 0.2 / draws):.1f} pp.", ""]
    lines += [f"**Datasets needed for {100 * TARGET:.0f}% power on both primary comparisons: {n}**"
              + ("" if n < max(DATASETS) else f" (not reached within {max(DATASETS)}: the grid's largest)") + ".", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=2000, help="simulated studies per cell (default 2000)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "results" / "dreg_study_v4_power")
    args = parser.parse_args(argv)
    spreads = v3_spreads()
    table = simulate(spreads, args.draws)
    args.out.mkdir(parents=True, exist_ok=True)
    text = report(spreads, table, args.draws)
    (args.out / "power.md").write_text(text)
    (args.out / "power.json").write_text(json.dumps({"spreads": spreads, "power": table, "needed": needed(table),
                                                     "effect": EFFECT, "seeds": SEEDS, "alpha": ALPHA,
                                                     "primary": PRIMARY, "draws": args.draws}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
