"""The transformer study v2's analysis, as pre-registered in
``docs/preregistration_transformer_v2.md``.

For arm A against arm B each dataset gives one paired difference per final seed,
``acc_A - acc_B`` in percentage points (the same seed: the same data draw and initialisation).
The effect is the mean over datasets of the mean over seeds, with a 95% hierarchical-bootstrap
interval (datasets, then seeds); the verdicts are the four words of
:func:`dreg_jax.analysis.effects.verdict` with the 0.5 pp margin.

**The test's unit is the dataset** (a re-analysis of the committed runs, after the results, issue
36): the exact one-sided signed-rank test over the per-dataset mean differences, Holm-corrected
over the regime's directional comparisons. The pre-registered test ran over the
per-(dataset, seed) differences, which treats seeds of one dataset as independent evidence and
so speaks to new seeds on these datasets only; its p-values are kept in the report as
description, never as a verdict. With 4 datasets (scratch) the smallest attainable one-sided p
is 2^-4 = 0.0625, with 2 (fine-tuning) 0.25: no directional comparison can reach alpha = 0.05.
"""
from __future__ import annotations

import collections
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dreg_jax.analysis.effects import can_reach, exact_signed_rank, hierarchical_bootstrap, verdict  # noqa: E402
from dreg_jax.analysis.stats import holm  # noqa: E402
from dreg_study_v3_analysis import forest_plot  # noqa: E402

CLAIMS = {
    "S1": "DREG is a good default for GELU transformers: DREG above none (from scratch)",
    "S2": "DREG is the best regularizer on clean accuracy: DREG above WD (from scratch)",
    "S3": "DREG is the best regularizer on clean accuracy: DREG above IGPen (the ViT)",
    "S4": "One fixed lambda = 10^-2.5 per token needs no tuning: tuned and fixed DREG are equivalent",
    "F1": "DREG helps a fine-tuned GELU transformer: MiniLM+DREG (tuned) above MiniLM+linear",
    "F2": "One fixed lambda: tuned and fixed-lambda MiniLM+DREG are equivalent",
    "F3": "Fine-tuning is the regime that matters: MiniLM fine-tuned above the frozen encoder's linear head",
}
def count_tuning_runs(rows) -> int:
    """Training runs of stage 1: every (strength, seed) of each ``dreg_jax.tune`` call (scratch),
    one run per fine-tuning tuning row."""
    tuning = [r for r in rows if r["stage"] == "tuning"]
    return sum(sum(x["seeds"] for x in r["rows"]) for r in tuning if r.get("rows")) + sum(
        1 for r in tuning if not r.get("rows") and "validation" in r)


def readme_markers(regime: str) -> tuple[str, str]:
    """The markers of the report's summary block, copied verbatim into docs/studies/transformer_v2.md."""
    return f"<!-- transformer-v2-{regime}-summary:begin -->", f"<!-- transformer-v2-{regime}-summary:end -->"


ARM_ORDER = ("none", "WD", "SN", "IGPen", "JacReg", "DREG-act", "DREG-act fixed", "DREG-ffn", "DREG-ffn fixed",
             "frozen+linear", "MiniLM+linear", "MiniLM+DREG", "MiniLM+DREG fixed")
ARCHITECTURE = {"digits": "ViT", "digits_corrupted": "ViT", "reviews": "text transformer",
                "reviews_noisy": "text transformer"}


def _arms(rows):
    present = {r["arm"] for r in rows}
    return [a for a in ARM_ORDER if a in present] + sorted(present - set(ARM_ORDER))


def accuracy(final) -> dict:
    """``{(dataset, arm, seed): test accuracy in pp}`` of the runs that finished."""
    return {(r["dataset"], r["arm"], r["seed"]): 100 * r["test"] for r in final if r.get("ok", True)}


def paired(acc, a, b, datasets) -> dict:
    """``{dataset: [acc_a - acc_b per seed present in both]}`` (datasets without a pair left out)."""
    out = {}
    for d in datasets:
        seeds = sorted(s for (dd, arm, s) in acc if dd == d and arm == a and (d, b, s) in acc)
        if seeds:
            out[d] = [acc[(d, a, s)] - acc[(d, b, s)] for s in seeds]
    return out


def analyse(rows, meta) -> dict:
    design = meta["design"]
    margin, alpha, resamples = design["margin"], design["alpha"], design["bootstrap"]
    final = [r for r in rows if r["stage"] == "final"]
    acc = accuracy(final)
    datasets = sorted({r["dataset"] for r in final})
    comps = []

    def add(claim, reading, a, b, kind="greater", only=None):
        effects = paired(acc, a, b, [d for d in datasets if only is None or d in only])
        if not effects:
            return
        test = exact_signed_rank([np.mean(v) for v in effects.values()])  # the unit: the dataset
        seeds = exact_signed_rank([x for v in effects.values() for x in v])  # pre-registered: description only
        comps.append({"claim": claim, "reading": reading, "label": f"{a} - {b}", "effects": effects, "kind": kind,
                      "p": test["p_greater"], "min_p": test["min_p"], "n": len(effects),
                      "wins": test["wins"], "ties": test["ties"], "losses": test["losses"],
                      "seed_p": seeds["p_greater"], "seed_pairs": seeds["wins"] + seeds["ties"] + seeds["losses"],
                      "seed_wins": seeds["wins"], "seed_ties": seeds["ties"], "seed_losses": seeds["losses"]})

    if meta["regime"] == "scratch":
        vision = [d for d in datasets if ARCHITECTURE.get(d) == "ViT"]
        for reading in ("DREG-act", "DREG-ffn"):
            add("S1", reading, reading, "none")
            add("S2", reading, reading, "WD")
            add("S3", reading, reading, "IGPen", only=vision)
            add("S4", reading, reading, f"{reading} fixed", kind="equivalent")
    else:
        add("F1", "MiniLM", "MiniLM+DREG", "MiniLM+linear")
        add("F2", "MiniLM", "MiniLM+DREG", "MiniLM+DREG fixed", kind="equivalent")
        add("F3", "MiniLM", "MiniLM+linear", "frozen+linear")
    directional = [c for c in comps if c["kind"] == "greater"]
    for c, p_holm, seed_holm in zip(directional, holm([c["p"] for c in directional]) if directional else [],
                                    holm([c["seed_p"] for c in directional]) if directional else []):
        c["p_holm"], c["seed_p_holm"] = float(p_holm), float(seed_holm)
    for i, c in enumerate(comps):
        ci = hierarchical_bootstrap(c["effects"], resamples, seed=i)
        c.update(mean=ci["mean"], low=ci["low"], high=ci["high"], per_unit=ci["per_unit"])
        c["verdict"] = verdict(c["low"], c["high"], c.get("p_holm", 1.0), margin, alpha, claim=c["kind"])
        c["reachable"] = c["kind"] != "greater" or can_reach(c["min_p"], alpha, len(directional))
    return {"comparisons": comps, "datasets": datasets, "accuracy": acc, "family": len(directional)}


def plateau(final, meta) -> list[dict]:
    """Per architecture: the none arm's (or fine-tuned MiniLM's) test accuracy at its plateau,
    the best epoch and the epochs run, and how often the cap bound (a run that reached the cap
    before ``patience`` epochs without improvement)."""
    design = meta["design"]
    out = []
    groups = collections.defaultdict(list)
    for r in final:
        if "epochs_run" in r:
            groups[ARCHITECTURE.get(r["dataset"], r["dataset"]) if meta["regime"] == "scratch" else "MiniLM fine-tuned"
                   ].append(r)
    for arch, runs in sorted(groups.items()):
        patience = {"ViT": design["vision_patience"], "text transformer": design["text_patience"]}.get(
            arch, design["ft_patience"])
        bound = [r for r in runs if r["epochs_run"] == r["cap"] and r["cap"] - r["best_epoch"] < patience]
        plain = [r for r in runs if r["arm"] in ("none", "MiniLM+linear")]
        # the training loss at the kept epoch: near zero means the data are fitted (the plateau
        # is a generalization limit, not a model still learning)
        train_loss = [r["curves"]["train_loss"][r["best_epoch"] - 1] for r in plain
                      if len(r.get("curves", {}).get("train_loss", [])) >= r["best_epoch"]]
        out.append({"architecture": arch, "runs": len(runs), "cap": runs[0]["cap"], "patience": patience,
                    "train_loss": float(np.mean(train_loss)) if train_loss else None,
                    "bound": len(bound), "best_epoch": float(np.mean([r["best_epoch"] for r in runs])),
                    "epochs_run": float(np.mean([r["epochs_run"] for r in runs])),
                    "plain_test": {d: float(np.mean([100 * r["test"] for r in plain if r["dataset"] == d]))
                                   for d in sorted({r["dataset"] for r in plain})}})
    return out


def learning_curves_plot(final, path, title):
    """Validation accuracy per epoch, one panel per dataset, one colour per arm: a thick line is
    the mean over the final seeds while every seed is still training, thin lines are each seed
    from then on (up to its stop)."""
    datasets = sorted({r["dataset"] for r in final if r.get("curves", {}).get("validation_accuracy")})
    if not datasets:
        return False
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.4 * len(datasets), 3.6), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for k, arm in enumerate(_arms(final)):
            curves = [r["curves"]["validation_accuracy"] for r in final
                      if r["dataset"] == d and r["arm"] == arm and r.get("curves", {}).get("validation_accuracy")]
            if not curves:
                continue
            colour, style = f"C{k % 10}", "--" if "fixed" in arm else "-"
            common = min(len(c) for c in curves)
            mean = 100 * np.mean([c[:common] for c in curves], axis=0)
            ax.plot(np.arange(1, common + 1), mean, lw=1.6, color=colour, ls=style, label=arm)
            for c in curves:
                if len(c) > common:
                    ax.plot(np.arange(common, len(c) + 1), 100 * np.asarray(c[common - 1:]), lw=0.6, alpha=0.6,
                            color=colour, ls=style)
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("validation accuracy (%)", fontsize=8)
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def tuning_plot(tuning, path):
    """Tuning-draw validation accuracy against strength, one panel per dataset, one line per arm."""
    points = collections.defaultdict(list)  # (dataset, arm) -> [(strength, accuracy)]
    for r in tuning:
        if r.get("rows"):  # dreg_jax.tune's rows (scratch)
            points[(r["dataset"], r["arm"])] += [(x["strength"], 100 * x["mean"]) for x in r["rows"] if x["strength"]]
        elif "validation" in r and r.get("strength"):  # one fine-tuning run per strength
            points[(r["dataset"], r["arm"])].append((r["strength"], 100 * r["validation"]))
    datasets = sorted({d for d, _ in points})
    if not datasets:
        return False
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.4 * len(datasets), 3.4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for (dd, arm), pts in sorted(points.items()):
            if dd == d and len(pts) > 1:
                s, v = zip(*sorted(pts))
                ax.plot(s, v, marker="o", ms=3, lw=1, label=arm)
        ax.set_xscale("log")
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("strength", fontsize=8)
        ax.set_ylabel("tuning validation accuracy (%)", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(rows, out: pathlib.Path, meta) -> str:
    out = pathlib.Path(out)
    regime, design = meta["regime"], meta["design"]
    final = [r for r in rows if r["stage"] == "final"]
    tuning = [r for r in rows if r["stage"] == "tuning"]
    picks = {r["dataset"]: r for r in rows if r["stage"] == "pick"}
    a = analyse(rows, meta)
    commit = meta.get("preregistration_commit")
    tuning_runs = count_tuning_runs(rows)
    md = [f"# Transformer study v2 - regime `{regime}`, profile `{meta['profile']}`", "",
          f"Pre-registered in `docs/preregistration_transformer_v2.md` at commit `{commit}` before any run of this "
          "profile; the runner is `experiments/transformer_study_v2.py`, this analysis "
          "`experiments/transformer_study_v2_analysis.py`.", "",
          f"{tuning_runs} tuning runs and {len(final)} final runs ({sum(not r.get('ok', True) for r in final)} not ok) "
          f"on {meta.get('backend', 'cpu')}; wall time {meta['wall_seconds']:.0f} s, {meta['compiled_programs']} "
          f"compiled training programs ({meta['compile_seconds']:.0f} s compiling"
          + (f", {meta['run_seconds']:.0f} s running steps" if meta.get("run_seconds") else "") + ").", ""]
    deviations = meta.get("deviations") or []
    md += ["Deviations from the pre-registration: " + ("; ".join(deviations) if deviations else "none") + ".", ""]
    # --- plateau
    md += ["## Trained to the plateau", "",
           "Every run scores its validation split after every epoch, stops once `patience` epochs in a row have "
           "not improved its best, and keeps the best epoch's parameters. The cap binds when a run reached it "
           "before `patience` epochs without improvement.", "",
           "| architecture | final runs | cap | patience | mean best epoch | mean epochs run | cap bound | "
           "plateau test accuracy, no regularizer (%) | its training loss at the kept epoch |",
           "|---|---|---|---|---|---|---|---|---|"]
    plat = plateau(final, meta)
    for p in plat:
        share = p["bound"] / p["runs"]
        md.append(f"| {p['architecture']} | {p['runs']} | {p['cap']} | {p['patience']} | {p['best_epoch']:.1f} | "
                  f"{p['epochs_run']:.1f} | {p['bound']} ({100 * share:.0f}%){' **plateau not reached**' if share > 0.1 else ''} | "
                  + ", ".join(f"{d} {v:.2f}" for d, v in p["plain_test"].items())
                  + f" | {'-' if p['train_loss'] is None else format(p['train_loss'], '.3f')} |")
    if learning_curves_plot(final, out / "learning_curves.png", f"{regime}: validation accuracy per epoch\n"
                            "(thick: mean over the final seeds while all train; thin: each seed until its stop)"):
        md += ["", "![learning curves](learning_curves.png)"]
    # --- accuracy table
    arms = _arms(final)
    md += ["", "## Test accuracy (%), mean +- std over the final seeds (best validation epoch)", "",
           "| dataset | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for d in a["datasets"]:
        cells = []
        for arm in arms:
            v = [x for (dd, aa, _), x in a["accuracy"].items() if dd == d and aa == arm]
            cells.append(f"{np.mean(v):.2f} +- {np.std(v):.2f}" if v else "")
        md.append(f"| {d} | " + " | ".join(cells) + " |")
    # --- strengths
    md += ["", "## Strengths: tuned on the tuning draw's validation split, and the fixed paper lambda", ""]
    lowest = []  # (dataset, arm) whose pick is the lowest strength tried: tuning switched it off
    if regime == "scratch":
        md += ["| dataset | arm | grid (tried) | tuned strength | extensions | on the edge | fixed (paper) |",
               "|---|---|---|---|---|---|---|"]
        fixed = {(r["dataset"], r["arm"].removesuffix(" fixed")): r["strength"] for r in tuning if r["arm"].endswith("fixed")}
        for r in sorted(tuning, key=lambda r: (r["dataset"], ARM_ORDER.index(r["arm"]) if r["arm"] in ARM_ORDER else 99)):
            if r["arm"].endswith("fixed"):
                continue
            tried = [x["strength"] for x in r["rows"]]
            grid = "-" if not any(tried) else f"{min(tried):.3g} .. {max(tried):.3g} ({len(tried)})"
            f = fixed.get((r["dataset"], r["arm"]))
            tuned = f"{r['strength']:.3g}" if any(tried) else "- (learning rate fixed, nothing to tune)"
            if any(tried):
                lowest += [(r["dataset"], r["arm"])] if r["strength"] <= min(tried) else []
                tuned += " (lowest tried)" if r["strength"] <= min(tried) else ""
            md.append(f"| {r['dataset']} | {r['arm']} | {grid} | {tuned} | {r['extensions']} | "
                      f"{'yes' if r['on_edge'] else 'no'} | {'' if f is None else f'{f:.3g}'} |")
    else:
        md += ["| dataset | tried (validation accuracy %) | tuned strength | extensions | on the edge | fixed (paper) |",
               "|---|---|---|---|---|---|"]
        for d, p in sorted(picks.items()):
            tried = sorted((r["strength"], 100 * r["validation"]) for r in tuning if r["dataset"] == d)
            lowest += [(d, "DREG")] if tried and p["strength"] <= tried[0][0] else []
            md.append(f"| {d} | " + ", ".join(f"{s:.3g}: {v:.1f}" for s, v in tried) + f" | {p['strength']:.3g} | "
                      f"{p['extensions']} | {'yes' if p['on_edge'] else 'no'} | "
                      f"{10 ** -2.5 / design['ft_length']:.3g} |")
    same = sorted({(r["dataset"], r["arm"].removesuffix(" fixed")) for r in final if r["arm"].endswith(" fixed")
                   and any(q["dataset"] == r["dataset"] and q["arm"] == r["arm"].removesuffix(" fixed")
                           and q["seed"] == r["seed"] and q["strength"] is not None
                           and np.isclose(q["strength"], r["strength"], rtol=1e-9) for q in final)})
    if same:
        md += ["", "Where tuning picked the fixed paper lambda itself, the tuned and the fixed arm are the same "
               "runs (an effect of exactly 0): " + ", ".join(f"{d} {arm}" for d, arm in same) + "."]
    tuned_cells = (sum(1 for r in tuning if not r["arm"].endswith("fixed") and any(x["strength"] for x in r["rows"]))
                   if regime == "scratch" else len(picks))
    md += ["", f"Switched off by tuning (the pick is the lowest strength tried): {len(lowest)} of {tuned_cells} "
           "tuned picks" + (": " + ", ".join(f"{d} {arm}" for d, arm in lowest) if lowest else "") + "."]
    if tuning_plot(tuning, out / "tuning.png"):
        md += ["", "![tuning](tuning.png)"]
    # --- claims
    begin, end = readme_markers(regime)
    smallest = 2.0 ** -len(a["datasets"])
    md += ["", "## The claims, with effect sizes", "", begin, "",
           f"Effect: mean over datasets of the per-seed paired differences (pp); 95% hierarchical bootstrap "
           f"({design['bootstrap']} draws: datasets, then seeds); margin {design['margin']} pp. **The test's unit "
           f"is the dataset**: exact one-sided signed-rank test over the {len(a['datasets'])} per-dataset mean "
           f"differences, Holm over the {a['family']} directional comparisons. This is a re-analysis after the "
           "results (issue 36): the pre-registered test ran over the per-(dataset, seed) differences, treating "
           "seeds of one dataset as independent evidence, and is shown as description only (last column, Holm "
           f"over the same family). With {len(a['datasets'])} datasets the smallest attainable p is "
           f"{smallest:.3g}: no directional comparison can reach alpha = {design['alpha']}, so no claim is "
           "SUPPORTED here, whatever its effect.", "",
           "| claim | comparison | effect (pp) | 95% interval | datasets up/tied/down | p (datasets) | p (Holm) | "
           "verdict | seed pairs up/tied/down, p (Holm) (pre-registered, description) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c in a["comparisons"]:
        ph = f"{c['p_holm']:.3g}" if "p_holm" in c else "-"
        note = "" if c["reachable"] or c["verdict"] != "INCONCLUSIVE" else " (cannot reach alpha)"
        p = f"{c['p']:.3g}" if c["kind"] == "greater" else "-"
        seed = (f"{c['seed_wins']}/{c['seed_ties']}/{c['seed_losses']}, {c['seed_p']:.3g} ({c['seed_p_holm']:.3g})"
                if c["kind"] == "greater" else f"{c['seed_wins']}/{c['seed_ties']}/{c['seed_losses']}")
        md.append(f"| {c['claim']} | {c['label']} | {c['mean']:+.2f} | [{c['low']:+.2f}, {c['high']:+.2f}] | "
                  f"{c['wins']}/{c['ties']}/{c['losses']} | {p} | {ph} | {c['verdict']}{note} | {seed} |")
    md += ["", "Plateau (no regularizer, test accuracy at the kept epoch): " + "; ".join(
        f"{p['architecture']} " + ", ".join(f"{d} {v:.2f}%" for d, v in p["plain_test"].items())
        + f" (cap bound in {p['bound']} of {p['runs']} runs)" for p in plat) + ".", "", end]
    md += ["", "### The papers' claims beside these verdicts", ""]
    by_claim = collections.defaultdict(list)
    for c in a["comparisons"]:
        by_claim[c["claim"]].append(c)
    for claim, comps in by_claim.items():
        md.append(f"- **{claim}** ({CLAIMS[claim]}): " + "; ".join(f"{c['label']} {c['verdict']}" for c in comps) + ".")
        forest_plot(f"{claim}: {CLAIMS[claim]}", comps, out / f"forest_{claim}.png")
        md.append(f"  ![{claim}](forest_{claim}.png)")
    unreachable = [c for c in a["comparisons"] if not c["reachable"] and c["verdict"] == "INCONCLUSIVE"]
    if unreachable:
        md += ["", f"{len(unreachable)} INCONCLUSIVE comparison(s) cannot reach alpha = {design['alpha']} after Holm "
               "with this many datasets (the smallest attainable p is too large): INCONCLUSIVE there is a "
               "statement about the sample size, not about DREG."]
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    return text
