r"""Gradient volatility over training: the ChainzRule "fair fight" (ChainzRule + DREG vs ReLU at
equal accuracy), reported beside the gradient tail ratio tau.

Claim (arXiv:2605.15463, docs/papers.md): on MNIST, at equal accuracy ChainzRule needs 15.5x
fewer parameters and its peak gradient volatility is 23.1% lower.

Runs (engine, 20% of each training split held out for validation): ChainzRule + DREG
(lambda = 10^-2.5, activation scope) and ReLU (no regularizer) MLPs with 2 hidden layers of
8, 16, 32, 64 and 128 units on digits and MNIST-1D, 5 seeds, Adam 1e-3, 20 epochs.

Volatility at step t is :math:`|\,\|g_t\| - \|g_{t-1}\|\,| / \|g_{t-1}\|` (the relative change of
the full-batch-step gradient norm, :func:`dreg_jax.engine.diagnostics.volatility`); *peak* is
its maximum over training, *mean* its mean; the per-epoch mean is plotted.

Equal accuracy: the target is ReLU's best mean validation accuracy over the widths minus 1 pp;
each model's smallest width whose mean validation accuracy reaches it is compared (parameters,
peak and mean volatility, test accuracy, tau). Validation data only decides the widths.

Usage: python experiments/chainzrule_volatility.py --profile quick|full [--out DIR]
"""
from __future__ import annotations

from _common import fast_compile_flags, run_study, wall_time_text

fast_compile_flags()

import collections  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dreg_jax.analysis.stats import signed_rank_test  # noqa: E402

PROFILES = {
    "full": dict(datasets=("digits", "mnist1d"), widths=(8, 16, 32, 64, 128), seeds=5, epochs=20, batch_size=64),
    "quick": dict(datasets=("digits",), widths=(8, 32), seeds=2, epochs=3, batch_size=64),
}
MODELS = {"CR+DREG": ("chainzrule", "dreg"), "ReLU": ("relu", "none")}
VALIDATION_FRACTION = 0.2
EQUAL_ACCURACY_PP = 1.0
PAPER = "MNIST fair fight: 15.5x fewer parameters, peak gradient volatility -23.1% (ChainzRule vs ReLU)"


def specs(profile):
    from dreg_jax.engine import SweepConfig

    out = []
    for w in profile["widths"]:
        for act, reg in MODELS.values():
            out += SweepConfig(datasets=tuple(profile["datasets"]), activations=(act,), regularizers=(reg,),
                               seeds=profile["seeds"], hidden=(w, w), epochs=profile["epochs"],
                               batch_size=profile["batch_size"], validation_fraction=VALIDATION_FRACTION).expand()
    return out


def parameter_count(dataset: str, activation: str, width: int) -> int:
    """Trainable parameters of the study MLP (ChainzRule's cubic coefficients included)."""
    import jax
    import jax.numpy as jnp

    from dreg_jax.data.registry import REGISTRY
    from dreg_jax.training.config import ModelConfig, TrainConfig
    from dreg_jax.training.train import build_model

    info = REGISTRY[dataset]
    model = build_model(TrainConfig(model=ModelConfig(hidden=(width, width), activation=activation)), info.num_classes)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, info.num_features), jnp.float32))
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes["params"])))


def _name(record):
    c = record["spec"]["config"]
    return {v: k for k, v in MODELS.items()}[(c["model"]["activation"], c["regularizer"]["kind"])]


def write_report(records, profile, out: pathlib.Path, wall: float | None) -> str:
    runs = collections.defaultdict(list)
    for r in sorted(records, key=lambda r: r["spec"]["seed"]):
        runs[(r["spec"]["dataset"], _name(r), r["spec"]["config"]["model"]["hidden"][0])].append(r)

    def arr(k, f):
        return np.array([f(r) if r["status"] == "ok" else np.nan for r in runs[k]], float)

    lines = [f"# Gradient volatility: ChainzRule + DREG vs ReLU - {len(records)} runs", "",
             f"Profile: {json.dumps(profile)}. {wall_time_text(out, wall)}", "", f"Paper (docs/papers.md): {PAPER}.", "",
             "Volatility = relative change of the gradient norm between consecutive steps; peak = its maximum over "
             "training, mean = its mean. tau = p99 / mean per-example gradient norm at the end of training.", ""]
    verdict_rows = []
    for d in profile["datasets"]:
        lines += [f"## {d}", "", "| model | width | parameters | validation acc (%) | test acc (%) | peak volatility | "
                  "mean volatility | tau |", "|---|---|---|---|---|---|---|---|"]
        for m, (act, _) in MODELS.items():
            for w in profile["widths"]:
                k = (d, m, w)
                lines.append(
                    f"| {m} | {w} | {parameter_count(d, act, w):,} | "
                    f"{100 * np.nanmean(arr(k, lambda r: r['metrics']['validation_accuracy'])):.2f} | "
                    f"{100 * np.nanmean(arr(k, lambda r: r['metrics']['test_accuracy'])):.2f} | "
                    f"{np.nanmean(arr(k, lambda r: r['metrics']['volatility_peak'])):.3f} | "
                    f"{np.nanmean(arr(k, lambda r: np.mean(r['curves']['volatility']))):.4f} | "
                    f"{np.nanmean(arr(k, lambda r: r['metrics']['tau'])):.3f} |")
        val = {(m, w): np.nanmean(arr((d, m, w), lambda r: r["metrics"]["validation_accuracy"]))
               for m in MODELS for w in profile["widths"]}
        target = max(val[("ReLU", w)] for w in profile["widths"]) - EQUAL_ACCURACY_PP / 100
        chosen = {m: next((w for w in profile["widths"] if val[(m, w)] >= target), None) for m in MODELS}
        lines += ["", f"Equal accuracy (validation >= {100 * target:.2f}%, ReLU's best minus {EQUAL_ACCURACY_PP:g} pp): "
                  + ", ".join(f"{m} width {w}" if w else f"{m} never reaches it" for m, w in chosen.items()) + "."]
        if all(chosen.values()):
            kc, kr = (d, "CR+DREG", chosen["CR+DREG"]), (d, "ReLU", chosen["ReLU"])
            pc, pr = parameter_count(d, "chainzrule", chosen["CR+DREG"]), parameter_count(d, "relu", chosen["ReLU"])
            peak_c, peak_r = arr(kc, lambda r: r["metrics"]["volatility_peak"]), arr(kr, lambda r: r["metrics"]["volatility_peak"])
            mean_c = arr(kc, lambda r: np.mean(r["curves"]["volatility"]))
            mean_r = arr(kr, lambda r: np.mean(r["curves"]["volatility"]))
            t_peak, t_mean = signed_rank_test(peak_r, peak_c), signed_rank_test(mean_r, mean_c)
            verdict_rows.append((d, pr / pc, 100 * (peak_c.mean() / peak_r.mean() - 1), 100 * (mean_c.mean() / mean_r.mean() - 1),
                                 t_peak, t_mean))
            lines.append(f"At those widths: parameters ReLU / CR+DREG = {pr / pc:.2f}x; peak volatility CR+DREG vs ReLU "
                         f"{verdict_rows[-1][2]:+.1f}% (one-sided p that CR+DREG is lower = {t_peak['p_greater']:.3g}, "
                         f"seeds paired); mean volatility {verdict_rows[-1][3]:+.1f}% (p = {t_mean['p_greater']:.3g}).")
        lines.append("")
    lines += ["## Beside the paper", ""]
    for d, ratio, peak, mean, t_peak, _ in verdict_rows:
        lines.append(f"- {d}: ReLU needs {ratio:.2f}x CR+DREG's parameters at equal accuracy (paper 15.5x): "
                     + ("fewer parameters for ChainzRule, smaller than the paper's factor" if 1 < ratio < 15.5 else
                        "reproduced" if ratio >= 15.5 else "not reproduced")
                     + f"; peak volatility {peak:+.1f}% (paper -23.1%): "
                     + ("lower, as in the paper" if peak < 0 else "higher, unlike the paper")
                     + f" (one-sided p = {t_peak['p_greater']:.3g} with {profile['seeds']} seeds, whose smallest "
                     f"possible p is {0.5 ** profile['seeds']:.3g}; uncorrected over the {len(verdict_rows)} datasets).")
    if not verdict_rows:
        lines.append("- No dataset had both models at equal accuracy: the comparison cannot be made.")
    _plot(runs, profile, out)
    lines += ["", "![volatility over training](volatility_curves.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines[-4:])


def _plot(runs, profile, out):
    fig, axes = plt.subplots(1, len(profile["datasets"]), figsize=(6 * len(profile["datasets"]), 3.6), squeeze=False)
    for ax, d in zip(axes[0], profile["datasets"]):
        for m, style in (("CR+DREG", "-"), ("ReLU", "--")):
            for w in profile["widths"][-2:]:
                curves = np.array([r["curves"]["volatility"] for r in runs[(d, m, w)] if r["status"] == "ok"])
                if len(curves):
                    ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(0), style, label=f"{m} {w}")
        ax.set_title(d)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean step volatility")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "volatility_curves.png", dpi=100)
    plt.close(fig)


def run(p, out, progress):
    from dreg_jax.engine import EngineOptions, enable_compilation_cache, run_sweep

    enable_compilation_cache()
    return run_sweep(specs(p), out / "results.jsonl", progress=progress, report=False,
                     options=EngineOptions(per_epoch_diagnostics=False))


def main(argv=None):
    return run_study(argv, __doc__, PROFILES, "chainzrule_volatility", run, write_report)

if __name__ == "__main__":
    main()
