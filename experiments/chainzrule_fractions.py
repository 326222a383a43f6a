"""ChainzRule vs MLPs vs SVM / XGBoost across training fractions (Pima, breast cancer).

Neural models (all through the engine, one compiled program per model and dataset, vmapped
over seeds x fractions): ChainzRule + DREG, ChainzRule, ReLU, ReLU + DREG, GELU, GELU + DREG;
2 hidden layers, Adam 1e-3, DREG lambda = 10**-2.5. Classical models: SVM and XGBoost tuned by
a small grid with cross-validation on the training subset only
(``experiments/classical.py``). Every model of a (seed, fraction) sees exactly the same
stratified training subset (``dreg_jax.engine.training_mask``), so the comparisons are paired.

Statistics: mean +- std over seeds per (dataset, fraction, model); two-sided paired Wilcoxon
signed-rank tests of ChainzRule + DREG against every other model over the seeds of each
(dataset, fraction), Bonferroni-corrected over all those comparisons. Plot: accuracy vs
fraction. Writes report.md + PNG into --out.

Usage: python experiments/chainzrule_fractions.py --profile quick|full [--out DIR]
"""
from __future__ import annotations

from _common import (
    NO_CLIP,
    REFERENCE,
    by_model,
    fast_compile_flags,
    load_raw_results,
    model_order,
    plot_accuracy_vs_fraction,
    run_neural_models,
    run_study,
    wall_time_text,
)

fast_compile_flags()

import json  # noqa: E402
import pathlib  # noqa: E402

import numpy as np  # noqa: E402

from dreg_jax.analysis import bonferroni, paired_wilcoxon, power_note  # noqa: E402
from classical import boosting_name, classical_scores  # noqa: E402

PROFILES = {
    "full": dict(datasets=("pima", "breast_cancer"), fractions=(0.05, 0.1, 0.25, 0.5, 1.0), seeds=20,
                 epochs=60, hidden=(64, 64), batch_size=32),
    "quick": dict(datasets=("pima",), fractions=(0.1, 1.0), seeds=3, epochs=10, hidden=(32, 32),
                  batch_size=32),
}
PAPER = "Pima Diabetes 85.71% +- 2.01 for ChainzRule, above SVM and XGBoost at every fraction (5%..100%)"


VALIDATION_FRACTION = 0.2


def neural_accuracies(records):
    return {(d, f, m, r["spec"]["seed"]): (r["metrics"]["test_accuracy"] if r["status"] == "ok" else np.nan)
            for (d, f, m), rs in by_model(records).items() for r in rs}


def boosting_model(out: pathlib.Path) -> str:
    """The boosting model of this report: the one whose scores classical.json holds (a rebuild
    reads them whatever is installed), else the one installed now (XGBoost or sklearn's GBDT)."""
    cache = out / "classical.json"
    if cache.exists():
        names = {key.split("|")[3] for key in json.loads(cache.read_text())} - {"SVM"}
        if len(names) == 1:
            return names.pop()
    return boosting_name()


def all_accuracies(records, profile, out: pathlib.Path, progress: bool, cached_only: bool = False):
    """Neural accuracies from ``records`` and the classical models' (cached in classical.json)."""
    acc = neural_accuracies(records)
    acc.update(classical_scores({"SVM": "svm", boosting_model(out): "boosting"}, profile["datasets"],
                                profile["fractions"], profile["seeds"], out / "classical.json", progress,
                                validation_fraction=VALIDATION_FRACTION, cached_only=cached_only))
    return acc


def write_report(acc, profile, out: pathlib.Path, wall: float | None) -> str:
    neural = {m for (_, _, m, _) in acc}
    boosting = boosting_model(out)
    models = model_order(neural) + ["SVM", boosting]
    seeds = range(profile["seeds"])
    lines = [f"# ChainzRule across training fractions - {len(acc)} results", "",
             f"Profile: {json.dumps(profile)}. {wall_time_text(out, wall)} Test splits: pima = MASS Pima.te "
             "(332), breast_cancer = stratified 25%.", ""]
    tests, table_txt = [], []
    for d in profile["datasets"]:
        lines += [f"## {d}: test accuracy (%), mean +- std over {profile['seeds']} seeds", "",
                  "| fraction | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for f in profile["fractions"]:
            cells = []
            for m in models:
                v = np.array([acc[(d, f, m, s)] for s in seeds])
                cells.append(f"{100 * np.nanmean(v):.2f} +- {100 * np.nanstd(v):.2f}")
            lines.append(f"| {int(round(100 * f))}% | " + " | ".join(cells) + " |")
            table_txt.append(f"{d:<14}{int(round(100 * f)):>4}%  " + "  ".join(f"{m}={c.split(' ')[0]}" for m, c in zip(models, cells)))
            ref = np.array([acc[(d, f, REFERENCE, s)] for s in seeds])
            for m in models:
                if m != REFERENCE:
                    t = paired_wilcoxon(ref, np.array([acc[(d, f, m, s)] for s in seeds]))
                    tests.append((d, f, m, t))
        lines.append("")
    corrected = bonferroni([t["p"] for *_, t in tests])
    lines += [f"## {REFERENCE} vs each model: paired Wilcoxon over seeds, Bonferroni over {len(tests)} tests", "",
              "| dataset | fraction | vs | wins/ties/losses | mean diff (pp) | p | p (Bonferroni) |",
              "|---|---|---|---|---|---|---|"]
    for (d, f, m, t), pc in zip(tests, corrected):
        lines.append(f"| {d} | {int(round(100 * f))}% | {m} | {t['wins']}/{t['ties']}/{t['losses']} | "
                     f"{100 * t['mean_diff']:+.2f} | {t['p']:.3g} | {pc:.3g} |")
    n_sig = sum(pc <= 0.05 for pc in corrected)
    lines += ["", "## Beside the paper", "", f"Paper: {PAPER}.", "",
              f"- Differences significant after Bonferroni: {n_sig} of {len(tests)} ({power_note(profile['seeds'], len(tests))})."]
    for d in profile["datasets"]:
        above = [f for f in profile["fractions"]
                 if all(np.nanmean([acc[(d, f, REFERENCE, s)] for s in seeds]) >
                        np.nanmean([acc[(d, f, m, s)] for s in seeds]) for m in ("SVM", boosting))]
        full = np.array([acc[(d, max(profile["fractions"]), REFERENCE, s)] for s in seeds])
        lines.append(f"- {d}: {REFERENCE} at {int(100 * max(profile['fractions']))}% data: "
                     f"{100 * np.nanmean(full):.2f} +- {100 * np.nanstd(full):.2f}%. Mean above both SVM and "
                     f"{boosting} at {len(above)} of {len(profile['fractions'])} fractions "
                     f"({', '.join(f'{int(round(100 * f))}%' for f in above) or 'none'}): "
                     f"{'SUPPORTED' if len(above) == len(profile['fractions']) else 'NOT SUPPORTED'} here.")
    if REFERENCE + NO_CLIP in models:
        for d in profile["datasets"]:
            diffs = [np.nanmean([acc[(d, f, REFERENCE, s)] - acc[(d, f, REFERENCE + NO_CLIP, s)] for s in seeds])
                     for f in profile["fractions"]]
            lines.append(f"- Input-clip ablation, {d}: {REFERENCE} minus {REFERENCE + NO_CLIP} (the clip is ours, not "
                         "the papers'): " + ", ".join(f"{int(round(100 * f))}% {100 * x:+.2f} pp"
                                                      for f, x in zip(profile["fractions"], diffs))
                         + " (tests in the table above).")
    plot_accuracy_vs_fraction(acc, profile["datasets"], profile["fractions"], profile["seeds"], models,
                              out / "accuracy_vs_fraction.png")
    lines += ["", "![accuracy vs fraction](accuracy_vs_fraction.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return "\n".join(table_txt)


def run(profile, out, progress):
    records = run_neural_models(profile["datasets"], profile["fractions"], profile["seeds"], profile["hidden"],
                                profile["epochs"], profile["batch_size"], out, progress,
                                clip_ablation=True, validation_fraction=VALIDATION_FRACTION)
    return all_accuracies(records, profile, out, progress)


def main(argv=None):
    return run_study(argv, __doc__, PROFILES, "chainzrule_fractions", run, write_report)


def rebuild_report(out, meta) -> str:
    """The report from ``out``'s raw results, classical.json and meta.json (rebuild_report.py)."""
    profile = PROFILES[meta["profile"]]
    # the cached scores of whatever boosting model the study ran, never a retraining
    return write_report(all_accuracies(load_raw_results(out), profile, out, False, cached_only=True), profile, out, None)


if __name__ == "__main__":
    main()
