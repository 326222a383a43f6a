"""Frozen-encoder text classification: ChainzRule head vs MLP heads vs logistic regression.

Datasets: the offline product reviews and their noisy version (typos, swaps, deletions, word
dropout at rate 0.2). The text representation is frozen: all-MiniLM-L6-v2 sentence embeddings
(384-d) when the ``encoder`` extra is installed, hashed word/char n-gram features (512 buckets,
``dreg_jax.data.text``) otherwise; ``--featurizer hashed|minilm`` picks one. Heads: ChainzRule +- DREG, ReLU +- DREG, GELU +- DREG
(2 hidden layers; engine runs vmapped over seeds x fractions) and logistic regression tuned by
CV on the training subset only; every model of a (seed, fraction) sees the same subset.
Accuracy vs training fraction, mean +- std, paired Wilcoxon of CR+DREG vs each model
(Bonferroni).

Usage: python experiments/chainzrule_text.py --profile quick|full [--featurizer auto|hashed|minilm] [--out DIR]
(default out: results/chainzrule_text/<profile>_<featurizer>)
"""
from __future__ import annotations

from _common import (
    compile_summary,
    NEURAL_MODELS,
    REFERENCE,
    by_model,
    experiment_args,
    fast_compile_flags,
    load_raw_results,
    plot_accuracy_vs_fraction,
    run_neural_models,
    wall_time_text,
    write_meta,
)

fast_compile_flags()

import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from dreg_jax.analysis import bonferroni, paired_wilcoxon, power_note  # noqa: E402
from classical import classical_scores  # noqa: E402

PROFILES = {
    "full": dict(datasets=("reviews", "reviews_noisy"), fractions=(0.05, 0.1, 0.25, 0.5, 1.0), seeds=20,
                 epochs=20, hidden=(64, 64), batch_size=64),
    "quick": dict(datasets=("reviews",), fractions=(0.1, 1.0), seeds=2, epochs=3, hidden=(32, 32), batch_size=64),
}
PAPER = "SST-5 with a frozen sentence encoder: ChainzRule head 46.20% +- 0.37"


def resolve_featurizer(choice: str) -> str:
    """``auto``: MiniLM when the encoder extra is installed, else hashed n-grams."""
    from dreg_jax.data.text import encoder_available

    if choice == "auto":
        return "minilm" if encoder_available() else "hashed"
    if choice == "minilm" and not encoder_available():
        raise SystemExit("--featurizer minilm needs the encoder extra: pip install '.[encoder]'")
    return choice


VALIDATION_FRACTION = 0.2


def accuracies(profile, out: pathlib.Path, progress: bool, featurizer: str = "hashed", records=None):
    """Neural accuracies (from ``records``, or trained now) and logistic regression's (cached)."""
    rebuilding = records is not None  # a rebuild reads the cached scores, never trains
    if records is None:
        records = run_neural_models(profile["datasets"], profile["fractions"], profile["seeds"], profile["hidden"],
                                    profile["epochs"], profile["batch_size"], out, progress, featurizer=featurizer,
                                    validation_fraction=VALIDATION_FRACTION)
    acc = {(d, f, m, r["spec"]["seed"]): (r["metrics"]["test_accuracy"] if r["status"] == "ok" else np.nan)
           for (d, f, m), rs in by_model(records).items() for r in rs}
    acc.update(classical_scores({"LogReg": "logreg"}, profile["datasets"], profile["fractions"],
                                profile["seeds"], out / "logreg.json", progress, featurizer=featurizer,
                                validation_fraction=VALIDATION_FRACTION, cached_only=rebuilding))
    return acc


REPRESENTATIONS = {"hashed": "hashed word 1-2-gram + char 3-gram counts, 512 buckets (frozen)",
                   "minilm": "all-MiniLM-L6-v2 sentence embeddings, 384-d (frozen encoder)"}


def write_report(acc, profile, out: pathlib.Path, wall: float | None, featurizer: str = "hashed") -> str:
    models = list(NEURAL_MODELS.values()) + ["LogReg"]
    seeds = range(profile["seeds"])
    lines = [f"# Frozen-representation text heads - {len(acc)} results", "",
             f"Profile: {json.dumps(profile)}. {wall_time_text(out, wall)} Representation: {REPRESENTATIONS[featurizer]}.", ""]
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
    cells = [(d, f) for d in profile["datasets"] for f in profile["fractions"]]
    mean = {(d, f, m): np.nanmean([acc[(d, f, m, s)] for s in seeds]) for d, f in cells for m in models}
    neural = list(NEURAL_MODELS.values())
    best_neural = sum(max(neural, key=lambda m: mean[(d, f, m)]) == REFERENCE for d, f in cells)
    above_lr = sum(mean[(d, f, REFERENCE)] > mean[(d, f, "LogReg")] for d, f in cells)
    sig = [(d, f, m, t) for (d, f, m, t), pc in zip(tests, corrected) if pc <= 0.05]
    lines += ["", "## Beside the paper", "", f"- Paper: {PAPER}. Our task is binary (great vs other) product reviews, "
              "not 5-class SST-5: accuracies are not comparable in level, only the ranking of heads.",
              f"- {REFERENCE} is the best neural head in {best_neural} of {len(cells)} (dataset, fraction) cells and "
              f"above logistic regression in {above_lr} of {len(cells)}.",
              f"- Differences significant after Bonferroni: {len(sig)} of {len(tests)}"
              + (": " + "; ".join(f"{d} {int(round(100 * f))}% vs {m} {100 * t['mean_diff']:+.2f} pp" for d, f, m, t in sig)
                 if sig else "") + f" ({power_note(profile['seeds'], len(tests))}).",
              f"- A ChainzRule head is the best head on a frozen representation: "
              f"{'SUPPORTED' if above_lr == len(cells) and best_neural == len(cells) else 'NOT SUPPORTED'} here "
              f"({'logistic regression is the stronger head' if above_lr < len(cells) / 2 else 'mixed'}).", "",
              "![accuracy vs fraction](text_accuracy_vs_fraction.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return "\n".join(summary)


def main(argv=None):
    def add_arguments(parser):
        parser.add_argument("--featurizer", choices=("auto", "hashed", "minilm"), default="auto",
                            help="frozen text representation (auto: minilm when the encoder extra is installed)")

    args, out = experiment_args(argv, __doc__, PROFILES, "chainzrule_text", add_arguments,
                                run_label=lambda a: f"{a.profile}_{resolve_featurizer(a.featurizer)}")
    featurizer = resolve_featurizer(args.featurizer)
    p = PROFILES[args.profile]
    write_meta(out, "chainzrule_text", args.profile, featurizer=featurizer)
    start = time.perf_counter()
    acc = accuracies(p, out, not args.no_progress, featurizer)
    print(write_report(acc, p, out, time.perf_counter() - start, featurizer))
    print(f"wrote {out / 'report.md'}")
    print(compile_summary())
    return acc


def rebuild_report(out, meta) -> str:
    """The report from ``out``'s raw results, logreg.json and meta.json (rebuild_report.py)."""
    p, featurizer = PROFILES[meta["profile"]], meta["featurizer"]
    acc = accuracies(p, out, False, featurizer, records=load_raw_results(out))
    return write_report(acc, p, out, None, featurizer)


if __name__ == "__main__":
    main()
