"""Lambda schedules for ChainzRule + DREG on clean vs noisy datasets (ablation).

Schedules (``lambda_t = lambda_0 * m_t``, ``lambda_0 = 10**-2.5``; formulas in
``dreg_jax.penalties.schedules``): constant; linear warmup over the first 25% of steps; cosine
decay to 0; and inverse to the measured representation noise, ``m_t = 1 / (1 + N_t / S_t)``
with ``N_t / S_t`` the within- over between-class scatter of the last hidden layer on the
training batch (``noise_inv``) or of the input features (``noise_inv_input``). Plus ChainzRule
without DREG as the reference for the penalty's own effect.

Datasets come in clean / noisy pairs (digits / digits_corrupted, mnist1d / mnist1d_noisy,
reviews / reviews_noisy with hashed n-gram features as the frozen representation). Reports
test accuracy per schedule and dataset, the gain of each schedule over the constant one on
clean vs noisy sets (paired Wilcoxon over seeds, Bonferroni), the measured representation
noise per dataset, and whether the best schedule differs between clean and noisy data (the
paper: "the best lambda schedule depends on representation noise").

Usage: python experiments/chainzrule_schedules.py --profile quick|full [--out DIR]
"""
from __future__ import annotations

from _common import fast_compile_flags, run_study, wall_time_text

fast_compile_flags()

import collections  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dreg_jax.analysis import bonferroni, paired_wilcoxon, power_note  # noqa: E402
from dreg_study_analysis import LEARNABLE_MARGIN, is_learned  # noqa: E402
from dreg_jax.penalties.dreg import DEFAULT_LAMBDA  # noqa: E402

PROFILES = {
    "full": dict(pairs=(("digits", "digits_corrupted"), ("mnist1d", "mnist1d_noisy"), ("reviews", "reviews_noisy")),
                 seeds=20, epochs=30, hidden=(64, 64), batch_size=64),
    "quick": dict(pairs=(("digits", "digits_corrupted"),), seeds=2, epochs=3, hidden=(32, 32), batch_size=64),
}
#: report name -> (regularizer kind, strength schedule, noise representation, lambda_0 / 10**-2.5)
VARIANTS = {
    "CR (no DREG)": ("none", "constant", "penultimate", 1.0),
    "constant": ("dreg", "constant", "penultimate", 1.0),
    "linear_warmup": ("dreg", "linear_warmup", "penultimate", 1.0),
    "cosine_decay": ("dreg", "cosine_decay", "penultimate", 1.0),
    "noise_inv": ("dreg", "noise_inverse", "penultimate", 1.0),
    "noise_inv_input": ("dreg", "noise_inverse", "input", 1.0),
    # amount controls: cosine at 2 lambda_0 has constant's integrated strength (mean m_t = 1/2)
    "cosine_decay 2x": ("dreg", "cosine_decay", "penultimate", 2.0),
    "constant 2x": ("dreg", "constant", "penultimate", 2.0),
}
SCHEDULED = [v for v, (kind, *_, factor) in VARIANTS.items() if kind == "dreg" and factor == 1.0]
PAPER = "the best lambda schedule depends on representation noise (no numbers given)"
VALIDATION_FRACTION = 0.2
def learnable(groups, dataset) -> tuple[bool, float, float]:
    """``(learned, validation accuracy of CR without DREG, chance)`` for a dataset, by the DREG
    study's rule (``dreg_study_analysis.is_learned``)."""
    from dreg_jax.data.registry import REGISTRY

    chance = 1.0 / REGISTRY[dataset].num_classes
    vals = [r["metrics"].get("validation_accuracy") for r in groups[(dataset, "CR (no DREG)")]]
    vals = [v for v in vals if v is not None]
    v = float(np.mean(vals)) if vals else float("nan")
    return is_learned(v, chance), v, chance


def specs(profile):
    from dreg_jax.engine import SweepConfig

    datasets = [d for pair in profile["pairs"] for d in pair]
    base = SweepConfig(datasets=tuple(datasets), activations=("chainzrule",), regularizers=("none", "dreg"),
                       seeds=profile["seeds"], hidden=tuple(profile["hidden"]), epochs=profile["epochs"],
                       batch_size=profile["batch_size"], validation_fraction=VALIDATION_FRACTION).expand()
    out = []
    for spec in base:
        reg = spec.config.regularizer
        for kind, schedule, representation, factor in VARIANTS.values():
            if kind == reg.kind:
                r = dataclasses.replace(reg, strength_schedule=schedule, noise_representation=representation,
                                        strength=None if factor == 1.0 else factor * DEFAULT_LAMBDA)
                out.append(dataclasses.replace(spec, config=dataclasses.replace(spec.config, regularizer=r)))
    return out


def variant_name(record) -> str:
    r = record["spec"]["config"]["regularizer"]
    factor = 1.0 if r["strength"] is None else round(r["strength"] / DEFAULT_LAMBDA, 6)
    key = (r["kind"], r.get("strength_schedule", "constant"), r.get("noise_representation", "penultimate"), factor)
    if key[0] == "none":
        key = ("none", "constant", "penultimate", 1.0)
    if key[1] != "noise_inverse":
        key = (key[0], key[1], "penultimate", factor)
    return {v: k for k, v in VARIANTS.items()}[key]


def group(records):
    """``{(dataset, variant): [record, ...]}`` sorted by seed."""
    groups = collections.defaultdict(list)
    for r in sorted(records, key=lambda r: r["spec"]["seed"]):
        groups[(r["spec"]["dataset"], variant_name(r))].append(r)
    return groups


def write_report(records, profile, out: pathlib.Path, wall: float | None) -> str:
    groups = group(records)
    acc = {k: np.array([r["metrics"]["test_accuracy"] for r in rs]) for k, rs in groups.items()}
    val = {k: np.array([r["metrics"].get("validation_accuracy", np.nan) for r in rs], float) for k, rs in groups.items()}
    datasets = [c for c, _ in profile["pairs"]] + [n for _, n in profile["pairs"]]
    status = {d: learnable(groups, d) for d in datasets}
    pairs = [(c, n) for c, n in profile["pairs"] if status[c][0] and status[n][0]]
    apart = [d for d in datasets if not status[d][0]]
    clean, noisy = [c for c, _ in pairs], [n for _, n in pairs]
    failed = sum(r["status"] != "ok" for r in records)
    lines = [f"# Lambda schedules for ChainzRule + DREG - {len(records)} runs ({failed} failed)", "",
             f"Profile: {json.dumps(profile)}. {wall_time_text(out, wall)} lambda_0 = 10^-2.5, activation scope, "
             "2 hidden ChainzRule layers, Adam 1e-3, 100% of the training data.", "",
             "Schedules: constant; linear_warmup m_t = min(1, (t+1)/(0.25 T)); cosine_decay m_t = (1 + cos(pi t/T))/2; "
             "noise_inv m_t = 1/(1 + N_t/S_t) with N_t/S_t the within/between-class scatter of the last hidden layer "
             "on the training batch; noise_inv_input the same on the input features.", "",
             f"A stratified {VALIDATION_FRACTION:.0%} of each training split is held out for validation; the best "
             "schedule is picked on validation accuracy, test accuracy is reported.", "",
             (f"Reported apart (not learned: validation accuracy of CR without DREG below chance + "
              f"{100 * LEARNABLE_MARGIN:.0f} pp), with "
              "their pair left out of the clean/noisy means and the verdict: " + ", ".join(
                  f"{d} (validation {100 * status[d][1]:.2f}%, chance {100 * status[d][2]:.0f}%)" for d in apart) + "."
              if apart else f"Every dataset is learned (validation accuracy of CR without DREG >= chance + "
              f"{100 * LEARNABLE_MARGIN:.0f} pp)."), "",
             "## Test accuracy (%), mean +- std over seeds", "",
             "| schedule | " + " | ".join(datasets) + " | clean mean | noisy mean | mean m_t |",
             "|---|" + "---|" * (len(datasets) + 3)]
    for v in VARIANTS:
        cells = [f"{100 * acc[(d, v)].mean():.2f} +- {100 * acc[(d, v)].std():.2f}" for d in datasets]
        cm = 100 * np.mean([acc[(d, v)].mean() for d in clean]) if clean else np.nan
        nm = 100 * np.mean([acc[(d, v)].mean() for d in noisy]) if noisy else np.nan
        m = (f'{np.mean([np.mean(r["curves"]["strength_multiplier"]) for d in datasets for r in groups[(d, v)]]):.3f}'
             if v != "CR (no DREG)" else "0 (no penalty)")
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {cm:.2f} | {nm:.2f} | {m} |")
    lines += ["", "mean m_t: the schedule's multiplier averaged over training and datasets, i.e. the integrated "
              "strength relative to constant at lambda_0 (the 2x rows run at 2 lambda_0; their m_t is relative to "
              "that). A schedule changes both the shape and the total amount of regularization; the 2x rows separate "
              "the two: `cosine_decay 2x` has the integrated strength of `constant`, and `constant 2x` shows what "
              "more strength alone does."]
    # measured representation noise (from the noise_inv runs: mean over the last epoch's steps)
    rep = {d: np.mean([r["curves"]["representation_noise"][-1] for r in groups[(d, "noise_inv")]]) for d in datasets}
    rep_in = {d: np.mean([r["curves"]["representation_noise"][-1] for r in groups[(d, "noise_inv_input")]]) for d in datasets}
    mult = {d: np.mean([np.mean(r["curves"]["strength_multiplier"]) for r in groups[(d, "noise_inv")]]) for d in datasets}
    lines += ["", "## Measured representation noise N/S (last epoch, noise_inv runs)", "",
              "| dataset | regime | N/S last hidden layer | N/S input features | mean m_t of noise_inv |", "|---|---|---|---|---|"]
    for d in datasets:
        lines.append(f"| {d} | {'clean' if d in clean else 'noisy'} | {rep[d]:.3f} | {rep_in[d]:.3f} | {mult[d]:.3f} |")
    higher = sum(rep[n] > rep[c] for c, n in profile["pairs"])
    lines += ["", f"The noisy member of a pair has the higher measured representation noise in {higher} of "
              f"{len(profile['pairs'])} pairs.", ""]
    # gains over the constant schedule, paired by seed
    tests = [(d, v, paired_wilcoxon(acc[(d, v)], acc[(d, "constant")])) for d in datasets for v in VARIANTS if v != "constant"]
    corrected = bonferroni([t["p"] for *_, t in tests])
    lines += [f"## Each schedule vs constant: paired Wilcoxon over seeds, Bonferroni over {len(tests)} tests", "",
              "| dataset | schedule | wins/ties/losses | mean diff (pp) | p | p (Bonferroni) |", "|---|---|---|---|---|---|"]
    for (d, v, t), pc in zip(tests, corrected):
        lines.append(f"| {d} | {v} | {t['wins']}/{t['ties']}/{t['losses']} | {100 * t['mean_diff']:+.2f} | {t['p']:.3g} | {pc:.3g} |")
    significant = [(d, v, t) for (d, v, t), pc in zip(tests, corrected) if pc <= 0.05]
    # picked on validation accuracy (never test)
    best = {regime: max(SCHEDULED, key=lambda v: np.mean([val[(d, v)].mean() for d in ds])) if ds else "n/a"
            for regime, ds in (("clean", clean), ("noisy", noisy))}
    best_per_dataset = {d: max(SCHEDULED, key=lambda v: val[(d, v)].mean()) for d in datasets}
    spread = {d: 100 * (max(acc[(d, v)].mean() for v in SCHEDULED) - min(acc[(d, v)].mean() for v in SCHEDULED))
              for d in datasets}
    depends = best["clean"] != best["noisy"]

    def diff(a, b, ds):
        return 100 * np.mean([acc[(d, a)].mean() - acc[(d, b)].mean() for d in ds]) if ds else np.nan

    lines += ["", "## Beside the paper", "", f"- ChainzRule paper: {PAPER}.",
              f"- Best schedule by mean validation accuracy: clean sets **{best['clean']}**, noisy sets **{best['noisy']}**; per dataset: "
              + ", ".join(f"{d} {best_per_dataset[d]}" for d in datasets) + ".",
              "- Spread between the best and the worst schedule per dataset: "
              + ", ".join(f"{d} {spread[d]:.2f} pp" for d in datasets) + ".",
              f"- Differences from constant significant after Bonferroni: {len(significant)} of {len(tests)}"
              + (" (" + "; ".join(f"{d} {v} {100 * t['mean_diff']:+.2f} pp" for d, v, t in significant) + ")" if significant else "")
              + f"; {power_note(profile['seeds'], len(tests))}.",
              "- Shape vs amount (regime means, pp): " + "; ".join(
                  f"{regime}: cosine_decay 2x - constant {diff('cosine_decay 2x', 'constant', ds):+.2f}, "
                  f"constant 2x - constant {diff('constant 2x', 'constant', ds):+.2f}, "
                  f"cosine_decay 2x - cosine_decay {diff('cosine_decay 2x', 'cosine_decay', ds):+.2f}"
                  for regime, ds in (("clean", clean), ("noisy", noisy))) + ".",
              "- Verdict: " + _verdict(best, depends, [(d, v, t["mean_diff"]) for d, v, t in significant
                                                       if v in SCHEDULED and d not in apart], clean, noisy), ""]
    _plots(groups, acc, datasets, clean, out)
    lines += ["![gain over constant](schedule_gains.png)", "", "![multipliers](schedule_multipliers.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    summary = [f"{v:<16}" + "  ".join(f"{d} {100 * acc[(d, v)].mean():6.2f}" for d in datasets) for v in VARIANTS]
    summary.append(f"best: clean {best['clean']}, noisy {best['noisy']}; significant vs constant: {len(significant)}/{len(tests)}")
    return "\n".join(summary)


def _verdict(best, depends, significant, clean, noisy) -> str:
    """``significant``: ``(dataset, schedule, mean diff vs constant)`` significant after correction.

    The claim needs a crossover backed by a test: a regime's best schedule significantly
    above constant on one of that regime's sets, or the other regime's best significantly
    below constant there (constant being this regime's best).
    """
    if not depends:
        return (f"the same schedule ({best['clean']}) is best on clean and noisy sets: NOT SUPPORTED by our runs"
                + ("." if significant else " (and no schedule differs significantly from constant)."))
    backing = []
    for regime, sets, other in (("clean", clean, "noisy"), ("noisy", noisy, "clean")):
        for d, v, diff in significant:
            if d in sets and ((v == best[regime] != "constant" and diff > 0) or
                              (best[regime] == "constant" and v == best[other] and diff < 0)):
                backing.append(f"{d} {v} {100 * diff:+.2f} pp")
    if not backing:
        return ("the best schedule differs between clean and noisy sets, but no significant difference backs "
                "the crossover (each regime's best vs constant on its own sets), so the ranking is within seed "
                "noise: NOT SUPPORTED by our runs.")
    return ("the best schedule differs between clean and noisy sets and significant differences back it ("
            + "; ".join(backing) + "): SUPPORTED in direction.")


def _plots(groups, acc, datasets, clean, out):
    others = [v for v in VARIANTS if v != "constant"]
    fig, ax = plt.subplots(figsize=(1.6 * len(datasets) + 3, 3.8))
    width = 0.8 / len(others)
    for i, v in enumerate(others):
        diffs = [100 * (acc[(d, v)] - acc[(d, "constant")]) for d in datasets]
        xs = np.arange(len(datasets)) + (i - (len(others) - 1) / 2) * width
        ax.bar(xs, [x.mean() for x in diffs], width, yerr=[x.std() / np.sqrt(len(x)) for x in diffs], label=v, capsize=2)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(datasets)), [f"{d}\n({'clean' if d in clean else 'noisy'})" for d in datasets], fontsize=8)
    ax.set_ylabel("accuracy minus constant schedule (pp)")
    ax.set_title("Gain over the constant schedule (mean +- s.e. over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "schedule_gains.png", dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(datasets), figsize=(2.8 * len(datasets), 3), squeeze=False, sharey=True)
    for ax, d in zip(axes[0], datasets):
        for v in SCHEDULED:
            m = np.array([r["curves"]["strength_multiplier"] for r in groups[(d, v)]]).mean(0)
            ax.plot(np.arange(1, len(m) + 1), m, label=v)
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("epoch")
    axes[0, 0].set_ylabel("m_t (epoch mean)")
    axes[0, -1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "schedule_multipliers.png", dpi=100)
    plt.close(fig)


def run(p, out, progress):
    from dreg_jax.engine import EngineOptions, enable_compilation_cache, run_sweep

    enable_compilation_cache()
    return run_sweep(specs(p), out / "results.jsonl", progress=progress, report=False,
                     options=EngineOptions(per_epoch_diagnostics=False))


def main(argv=None):
    return run_study(argv, __doc__, PROFILES, "chainzrule_schedules", run, write_report)

if __name__ == "__main__":
    main()
