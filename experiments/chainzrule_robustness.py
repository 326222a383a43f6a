"""Corruption robustness: train on clean digits and MNIST-1D, test on every corruption x severity.

Models: ChainzRule + DREG, ChainzRule, ReLU, ReLU + DREG, GELU, GELU + DREG (2 hidden layers,
Adam 1e-3, DREG lambda = 10**-2.5), trained on the clean training split with 100% of the data.
Evaluation on the dataset's robust test sets: for digits the 7 CIFAR-10-C style corruptions
(gaussian / shot / impulse noise, gaussian blur, contrast, brightness, pixelate) x 5 severities;
for MNIST-1D (a 1-D signal) Gaussian noise and feature dropout x 5 severities. Reports the mean
corruption accuracy (mCA, the mean over every corruption and severity) per model, the
per-corruption table (mean over severities), paired Wilcoxon tests of ChainzRule + DREG vs each
model over seeds (Bonferroni), and accuracy-vs-severity plots.

CIFAR-10 / CIFAR-10-C: with a network, ``load_dataset("cifar10")`` and the test-only
``cifar10_corrupted/<corruption>_<severity>`` sets resolve through tensorflow-datasets; this
script's profiles use the offline datasets only.

Usage: python experiments/chainzrule_robustness.py --profile quick|full [--out DIR]
"""
from __future__ import annotations

from _common import (NO_CLIP, REFERENCE, by_model, fast_compile_flags, present_models, run_neural_models, run_study,
                     wall_time_text)

fast_compile_flags()

import collections  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dreg_jax.analysis import bonferroni, paired_wilcoxon, power_note  # noqa: E402

PROFILES = {
    "full": dict(datasets=("digits", "mnist1d"), seeds=10, epochs=30, hidden=(64, 64), batch_size=64),
    "quick": dict(datasets=("digits",), seeds=2, epochs=5, hidden=(32, 32), batch_size=64),
}
PAPER = "CIFAR-10-C: ChainzRule +2.32% mean corruption accuracy"


def corruption_table(records):
    """``{(dataset, model): {corruption: (seeds, severities) accuracies}}`` and clean accuracy."""
    table, clean = {}, {}
    for (d, _, m), rs in by_model(records).items():
        per = collections.defaultdict(lambda: collections.defaultdict(list))
        for r in rs:
            for name, acc in r["metrics"]["robust_accuracy_per_set"].items():
                corruption, severity = re.match(r"(.+)_(\d)$", name).groups()
                per[corruption][int(severity)].append(acc)
        # sorted: a resumed or rebuilt report reads the sets back from JSON in another order
        table[(d, m)] = {c: np.array([v[s] for s in sorted(v)]).T for c, v in sorted(per.items())}
        clean[(d, m)] = np.array([r["metrics"]["test_accuracy"] for r in rs])
    return table, clean


def _verdict(gains: dict, significant: set) -> str:
    positive = [d for d, g in gains.items() if g > 0]
    if not positive:
        return "NOT SUPPORTED (no positive gain)"
    if len(positive) < len(gains):
        return f"MIXED (positive on {', '.join(positive)} only" + ("" if significant else "; none significant") + ")"
    if significant == set(gains):
        return "SUPPORTED (positive and significant on every dataset)"
    return "positive on every dataset but " + ("significant on " + ", ".join(sorted(significant)) + " only" if significant
                                                 else "not significant") + ": NOT SUPPORTED at alpha = 0.05"


def write_report(records, profile, out: pathlib.Path, wall: float | None) -> str:
    table, clean = corruption_table(records)
    models = present_models(records)
    lines = [f"# Corruption robustness - {len(records)} runs", "", f"Profile: {json.dumps(profile)}. "
             f"{wall_time_text(out, wall)} Models trained on clean data (100%), evaluated on every corruption x severity.", ""]
    summary, tests = [], []
    for d in profile["datasets"]:
        corruptions = list(table[(d, models[0])])
        mca = {m: np.mean([table[(d, m)][c].mean(axis=1) for c in corruptions], axis=0) for m in models}  # per seed
        lines += [f"## {d}: clean accuracy and mean corruption accuracy (mCA, %)", "",
                  "| model | clean | mCA | " + " | ".join(corruptions) + " |", "|---|---|---|" + "---|" * len(corruptions)]
        for m in models:
            lines.append(f"| {m} | {100 * clean[(d, m)].mean():.2f} | {100 * mca[m].mean():.2f} +- {100 * mca[m].std():.2f} | "
                         + " | ".join(f"{100 * table[(d, m)][c].mean():.2f}" for c in corruptions) + " |")
            summary.append(f"{d:<10}{m:<11} clean {100 * clean[(d, m)].mean():6.2f}  mCA {100 * mca[m].mean():6.2f}")
            if m != REFERENCE:
                tests.append((d, m, paired_wilcoxon(mca[REFERENCE], mca[m])))
        best_other = max((m for m in models if m != REFERENCE), key=lambda m: mca[m].mean())
        gain_relu = 100 * (mca[REFERENCE].mean() - mca["ReLU"].mean())
        lines += ["", f"{REFERENCE} mCA minus ReLU: {gain_relu:+.2f} pp; minus the best other model "
                  f"({best_other}): {100 * (mca[REFERENCE].mean() - mca[best_other].mean()):+.2f} pp."
                  + (f" Input-clip ablation (the clip is ours, not the papers'): {REFERENCE} minus {REFERENCE + NO_CLIP}: "
                     f"clean {100 * (clean[(d, REFERENCE)].mean() - clean[(d, REFERENCE + NO_CLIP)].mean()):+.2f} pp, mCA "
                     f"{100 * (mca[REFERENCE].mean() - mca[REFERENCE + NO_CLIP].mean()):+.2f} pp."
                     if REFERENCE + NO_CLIP in models else ""), ""]
        # plot: accuracy vs severity per corruption
        fig, axes = plt.subplots(1, len(corruptions), figsize=(2.6 * len(corruptions), 2.8), squeeze=False)
        for ax, c in zip(axes[0], corruptions):
            for m in models:
                ax.plot(range(1, 6), 100 * table[(d, m)][c].mean(axis=0), marker=".", label=m,
                        lw=2.2 if m == REFERENCE else 1.0)
            ax.set_title(c, fontsize=9)
            ax.set_xlabel("severity", fontsize=8)
        axes[0, 0].set_ylabel("accuracy (%)")
        axes[0, -1].legend(fontsize=7)
        fig.suptitle(f"{d}: accuracy vs corruption severity")
        fig.tight_layout()
        fig.savefig(out / f"robustness_{d}.png", dpi=100)
        plt.close(fig)
        lines += [f"![{d}](robustness_{d}.png)", ""]
    corrected = bonferroni([t["p"] for *_, t in tests])
    lines += [f"## {REFERENCE} vs each model on mCA: paired Wilcoxon over seeds, Bonferroni over {len(tests)}", "",
              "| dataset | vs | wins/ties/losses | mean diff (pp) | p | p (Bonferroni) |", "|---|---|---|---|---|---|"]
    for (d, m, t), pc in zip(tests, corrected):
        lines.append(f"| {d} | {m} | {t['wins']}/{t['ties']}/{t['losses']} | {100 * t['mean_diff']:+.2f} | {t['p']:.3g} | {pc:.3g} |")
    gains = {d: 100 * np.mean([t["mean_diff"] for dd, m, t in tests if dd == d and m == "ReLU"]) for d in profile["datasets"]}
    sig = [(d, m, t) for (d, m, t), pc in zip(tests, corrected) if pc <= 0.05]
    lines += ["", "## Beside the paper", "",
              f"- Paper: {PAPER}. Our datasets are 8x8 digits and MNIST-1D, not CIFAR-10: the comparison is "
              "of direction and rough size only.",
              "- Ours, CR+DREG mCA minus ReLU: " + ", ".join(f"{d} {g:+.2f} pp" for d, g in gains.items()) + ".",
              f"- Differences significant after Bonferroni: {len(sig)} of {len(tests)}"
              + (": " + "; ".join(f"{d} vs {m} {100 * t['mean_diff']:+.2f} pp" for d, m, t in sig) if sig else "")
              + f" ({power_note(profile['seeds'], len(tests))}).",
              "- A robustness gain of ChainzRule + DREG over ReLU: " + _verdict(gains, {d for d, m, _ in sig if m == "ReLU"}) + "."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return "\n".join(summary)


def run(p, out, progress):
    return run_neural_models(p["datasets"], (1.0,), p["seeds"], p["hidden"], p["epochs"], p["batch_size"],
                             out, progress, clip_ablation=True)


def main(argv=None):
    return run_study(argv, __doc__, PROFILES, "chainzrule_robustness", run, write_report)

if __name__ == "__main__":
    main()
