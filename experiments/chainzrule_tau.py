"""Gradient tail ratio tau = p99 / mean of gradient norms, across training.

Runs the six models (ChainzRule +- DREG, ReLU +- DREG, GELU +- DREG) on pima and digits at
several training fractions with per-epoch diagnostics. Two readings of tau (see
``dreg_jax.engine.diagnostics``): ``tau``, label-free (the model's own predicted labels), from
per-example parameter-gradient norms of the loss on the first 128 test inputs; and
``tau_steps``, from the mini-batch gradient norms over the steps of the last epoch. Reports
final tau per model and fraction, checks the paper's ranges (ChainzRule 1.01-1.02,
ReLU/GELU-style 1.07-1.09), and whether tau predicts test accuracy across runs (Spearman rank
correlation). Plots both readings over epochs.

Usage: python experiments/chainzrule_tau.py --profile quick|full [--out DIR]
"""
from __future__ import annotations

from _common import NEURAL_MODELS, by_model, fast_compile_flags, run_neural_models, run_study, wall_time_text

fast_compile_flags()

import json  # noqa: E402
import pathlib  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

PROFILES = {
    "full": dict(datasets=("pima", "digits"), fractions=(0.05, 0.1, 0.25, 0.5, 1.0), seeds=5, epochs=30,
                 hidden=(64, 64), batch_size=32),
    "quick": dict(datasets=("pima",), fractions=(0.25, 1.0), seeds=2, epochs=4, hidden=(32, 32), batch_size=32),
}
PAPER_CR, PAPER_OTHERS = (1.01, 1.02), (1.07, 1.09)


READINGS = {
    "tau": "per-example parameter-gradient norms (the model's predicted labels) on 128 test inputs, after training",
    "tau_steps": "mini-batch gradient norms over the optimizer steps of the last epoch",
}


def write_report(records, profile, out: pathlib.Path, wall: float | None) -> str:
    groups = by_model(records)
    models = list(NEURAL_MODELS.values())
    ok = [r for r in records if r["status"] == "ok"]
    lines = [f"# Gradient tail ratio tau - {len(records)} runs", "", f"Profile: {json.dumps(profile)}. {wall_time_text(out, wall)}",
             "tau = p99 / mean of gradient norms, in two readings (the paper does not say over what the percentile runs): "
             + "; ".join(f"`{k}`: {v}" for k, v in READINGS.items()) + ". Mean +- std over seeds.", ""]
    summary, verdicts = [], []
    for key in READINGS:
        for d in profile["datasets"]:
            lines += [f"## {d}: final {key}", "", "| fraction | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
            for f in profile["fractions"]:
                cells = []
                for m in models:
                    t = np.array([r["metrics"][key] for r in groups[(d, f, m)]])
                    cells.append(f"{t.mean():.3f} +- {t.std():.3f}")
                lines.append(f"| {int(round(100 * f))}% | " + " | ".join(cells) + " |")
            lines.append("")
        taus = {m: np.array([r["metrics"][key] for (d, f, mm), rs in groups.items() if mm == m for r in rs]) for m in models}
        cr_in = np.mean((taus["CR+DREG"] >= PAPER_CR[0]) & (taus["CR+DREG"] <= PAPER_CR[1]))
        others = np.concatenate([taus[m] for m in ("ReLU", "GELU")])
        oth_in = np.mean((others >= PAPER_OTHERS[0]) & (others <= PAPER_OTHERS[1]))
        lower = np.mean(np.median(taus["CR+DREG"]) < np.median(others))
        rho, p = stats.spearmanr([r["metrics"][key] for r in ok], [r["metrics"]["test_accuracy"] for r in ok])
        # within one (dataset, fraction) cell: does lower tau go with higher accuracy at equal data?
        within = []
        for d in profile["datasets"]:
            for f in profile["fractions"]:
                cell = [r for (dd, ff, _), rs in groups.items() if (dd, ff) == (d, f) for r in rs if r["status"] == "ok"]
                within.append(stats.spearmanr([r["metrics"][key] for r in cell],
                                              [r["metrics"]["test_accuracy"] for r in cell])[0])
        verdict = "SUPPORTED" if cr_in > 0.5 and oth_in > 0.5 else "NOT SUPPORTED"
        verdicts += [f"- `{key}`: CR+DREG median {np.median(taus['CR+DREG']):.3f} (range {taus['CR+DREG'].min():.3f}-"
                     f"{taus['CR+DREG'].max():.3f}); {100 * cr_in:.0f}% of its runs fall in 1.01-1.02. ReLU and GELU median "
                     f"{np.median(others):.3f}; {100 * oth_in:.0f}% fall in 1.07-1.09. CR+DREG median "
                     f"{'below' if lower else 'not below'} ReLU/GELU's. Ranges {verdict}.",
                     f"  Does `{key}` predict test accuracy across runs? Spearman rho = {rho:.3f} (p = {p:.3g}, n = {len(ok)}), "
                     f"pooled over datasets and fractions (which move both); within a (dataset, fraction) cell the "
                     f"median rho is {np.nanmedian(within):.3f} (range {np.nanmin(within):.3f} to {np.nanmax(within):.3f}, "
                     f"{len(within)} cells). A useful label-free diagnostic would need a negative rho within cells."]
        summary.append(f"median {key}: " + ", ".join(f"{m} {np.median(taus[m]):.3f}" for m in models))
        summary.append(f"Spearman({key}, test accuracy) = {rho:.3f} (p = {p:.3g})")
    per_cell = len(models) * profile["seeds"]
    lines += ["## Beside the paper", "",
              "- Paper: tau of ChainzRule 1.01-1.02 and of ReLU/GELU-style nets 1.07-1.09 at every fraction.", *verdicts,
              f"- Power: the range check is descriptive (a share of runs, no test). The pooled Spearman test over "
              f"{len(ok)} runs detects |rho| >= {1.96 / np.sqrt(max(1, len(ok) - 3)):.2f} at alpha = 0.05 (two-sided, "
              f"Fisher z); a within-cell rho has {per_cell} runs and detects only |rho| >= "
              f"{1.96 / np.sqrt(max(1, per_cell - 3)):.2f}, uncorrected over the {len(within)} cells.", ""]
    # both readings over epochs, at the smallest and the full fraction
    for d in profile["datasets"]:
        fr = (min(profile["fractions"]), max(profile["fractions"]))
        fig, axes = plt.subplots(len(READINGS), 2, figsize=(11, 3.4 * len(READINGS)), squeeze=False)
        for row, key in zip(axes, READINGS):
            for ax, f in zip(row, fr):
                for m in models:
                    curves = np.array([r["curves"][key] for r in groups[(d, f, m)]])
                    ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(0), label=m, lw=2.2 if m == "CR+DREG" else 1.0)
                ax.set_title(f"{d}, {int(round(100 * f))}% data", fontsize=10)
                ax.set_xlabel("epoch")
                ax.set_ylabel(f"{key} (p99 / mean)")
        axes[0, 1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"tau_{d}.png", dpi=100)
        plt.close(fig)
        lines.append(f"![tau {d}](tau_{d}.png)")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return "\n".join(summary)


def run(p, out, progress):
    return run_neural_models(p["datasets"], p["fractions"], p["seeds"], p["hidden"], p["epochs"],
                             p["batch_size"], out, progress, per_epoch_diagnostics=True)


def main(argv=None):
    return run_study(argv, __doc__, PROFILES, "chainzrule_tau", run, write_report)

if __name__ == "__main__":
    main()
