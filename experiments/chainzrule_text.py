"""Frozen-encoder text classification: ChainzRule head vs MLP heads vs logistic regression.

Datasets: the offline product reviews and their noisy version (typos, swaps, deletions, word
dropout at rate 0.2). The text representation is frozen: hashed word/char n-gram features
(512 buckets, ``dreg_jax.data.text``). Heads: ChainzRule +- DREG, ReLU +- DREG, GELU +- DREG
(2 hidden layers; engine runs vmapped over seeds x fractions) and logistic regression tuned by
CV on the training subset only; every model of a (seed, fraction) sees the same subset.
Accuracy vs training fraction, mean +- std, paired Wilcoxon of CR+DREG vs each model
(Bonferroni).

The MiniLM sentence-encoder representation (``load_dataset(name, featurizer="minilm")``, the
``encoder`` extra) is available in the data layer; this script's engine runs use the hashed
features, which need no extra.

Usage: python experiments/chainzrule_text.py --profile quick|full [--out DIR]
"""
from __future__ import annotations

from dreg_jax.analysis.experiments import (
    NEURAL_MODELS,
    REFERENCE,
    by_model,
    experiment_args,
    fast_compile_flags,
    plot_accuracy_vs_fraction,
    run_neural_models,
)

fast_compile_flags()

import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from dreg_jax.analysis import bonferroni, paired_wilcoxon  # noqa: E402
from dreg_jax.analysis.classical import classical_scores  # noqa: E402

PROFILES = {
    "full": dict(datasets=("reviews", "reviews_noisy"), fractions=(0.05, 0.1, 0.25, 0.5, 1.0), seeds=5,
                 epochs=20, hidden=(64, 64), batch_size=64),
    "quick": dict(datasets=("reviews",), fractions=(0.1, 1.0), seeds=2, epochs=3, hidden=(32, 32), batch_size=64),
}
PAPER = "SST-5 with a frozen sentence encoder: ChainzRule head 46.20% +- 0.37"


def accuracies(profile, out: pathlib.Path, progress: bool):
    records = run_neural_models(profile["datasets"], profile["fractions"], profile["seeds"], profile["hidden"],
                                profile["epochs"], profile["batch_size"], out, progress)
    acc = {(d, f, m, r["spec"]["seed"]): (r["metrics"]["test_accuracy"] if r["status"] == "ok" else np.nan)
           for (d, f, m), rs in by_model(records).items() for r in rs}
    acc.update(classical_scores({"LogReg": "logreg"}, profile["datasets"], profile["fractions"],
                                profile["seeds"], out / "logreg.json", progress))
    return acc


def write_report(acc, profile, out: pathlib.Path, wall: float) -> str:
    models = list(NEURAL_MODELS.values()) + ["LogReg"]
    seeds = range(profile["seeds"])
    lines = [f"# Frozen-representation text heads - {len(acc)} results", "",
             f"Profile: {json.dumps(profile)}. Wall time {wall:.1f} s. Representation: hashed n-grams (frozen).", ""]
    tests, summary = [], []
    for d in profile["datasets"]:
        lines += [f"## {d}: test accuracy (%)", "", "| fraction | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for f in profile["fractions"]:
            vals = {m: np.array([acc[(d, f, m, s)] for s in seeds]) for m in models}
            lines.append(f"| {int(round(100 * f))}% | " + " | ".join(
                f"{100 * np.nanmean(v):.2f} +- {100 * np.nanstd(v):.2f}" for v in vals.values()) + " |")
            summary.append(f"{d:<14}{int(round(100 * f)):>4}%  " + "  ".join(f"{m}={100 * np.nanmean(v):.2f}" for m, v in vals.items()))
            tests += [(d, f, m, paired_wilcoxon(vals[REFERENCE], vals[m])) for m in models if m != REFERENCE]
        lines.append("")
    plot_accuracy_vs_fraction(acc, profile["datasets"], profile["fractions"], profile["seeds"], models,
                              out / "text_accuracy_vs_fraction.png")
    corrected = bonferroni([t["p"] for *_, t in tests])
    lines += [f"## {REFERENCE} vs each head: paired Wilcoxon over seeds, Bonferroni over {len(tests)}", "",
              "| dataset | fraction | vs | wins/ties/losses | mean diff (pp) | p | p (Bonferroni) |", "|---|---|---|---|---|---|---|"]
    for (d, f, m, t), pc in zip(tests, corrected):
        lines.append(f"| {d} | {int(round(100 * f))}% | {m} | {t['wins']}/{t['ties']}/{t['losses']} | "
                     f"{100 * t['mean_diff']:+.2f} | {t['p']:.3g} | {pc:.3g} |")
    lines += ["", f"Paper: {PAPER}. Our task is binary (great vs other) product reviews, not 5-class SST-5: "
              "accuracies are not comparable in level, only the ranking of heads.", "",
              "![accuracy vs fraction](text_accuracy_vs_fraction.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return "\n".join(summary)


def main(argv=None):
    args, out = experiment_args(argv, __doc__, PROFILES, "chainzrule_text")
    p = PROFILES[args.profile]
    start = time.perf_counter()
    acc = accuracies(p, out, not args.no_progress)
    print(write_report(acc, p, out, time.perf_counter() - start))
    print(f"wrote {out / 'report.md'}")
    return acc


if __name__ == "__main__":
    main()
