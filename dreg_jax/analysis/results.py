"""A sweep's results as a flat table, and plots for any sweep.

``load_results(path)`` reads a results JSONL (validated like a resumed sweep: bad lines are
set aside with a message) into a ``pandas.DataFrame`` with one row per run:

* the config, flattened: ``dataset, activation, hidden, regularizer, strength (resolved),
  learning_rate, epochs, batch_size, seed, data_fraction, label_noise, input_noise,
  dreg_scope, strength_schedule, featurizer`` and the rest of the regularizer fields;
* ``run_id, status, fail_step, diverge_step, seconds``;
* every final metric: scalars as they are, per-layer lists as ``jacobian_sq_norms_0, _1, ...``,
  per-set robust accuracies as ``robust_accuracy/<set>``.
"""
from __future__ import annotations

import pathlib

import numpy as np

from dreg_jax._files import save_figure
from dreg_jax.engine.store import CONFIG_COLUMNS, ResultsFile, flat_row, load_records  # noqa: F401 (re-exported)

def _curve(curves, metric):
    """One run's curve; ``data_loss`` is the train loss minus the penalty it includes."""
    if metric != "data_loss":
        values = curves.get(metric)
        return None if values is None else np.asarray(values, float).reshape(-1)
    loss = curves.get("train_loss")
    if loss is None:
        return None
    loss = np.asarray(loss, float).reshape(-1)
    penalty = curves.get("penalty")
    return loss if penalty is None else loss - np.asarray(penalty, float).reshape(-1)


def results_frame(records) -> "pandas.DataFrame":  # noqa: F821
    """One flat ``pandas.DataFrame`` row per record (see the module docstring)."""
    import pandas as pd

    return pd.DataFrame([flat_row(r) for r in records])


def load_results(path):
    """``pandas.DataFrame`` of a results JSONL, one flat row per run (see the module docstring)."""
    return results_frame(load_records(path))


def varying_columns(frame, candidates=None) -> list[str]:
    """Config columns whose value differs between runs (what a summary must group by)."""
    candidates = candidates or [c for c in frame.columns if c in CONFIG_COLUMNS or c in (
        "dreg_scope", "strength_schedule", "featurizer", "layer_estimator", "dreg_scaling")]
    return [c for c in candidates if c != "seed" and frame[c].astype(str).nunique() > 1]


def value_label(value) -> str:
    """A config value as a plot label: floats in short scientific notation (``3.2e-03``, not
    ``0.0031622776601683794``), everything else as is."""
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and value != int(value):
        return f"{value:.1e}"
    return str(value)


def plot_results(path, out_dir) -> list[pathlib.Path]:
    """Accuracy (a regression's :math:`R^2`) by regularizer (per dataset) and mean learning
    curves, as PNGs in ``out_dir``.

    Accuracy is drawn as dots with mean +- std over seeds on an axis zoomed to the data (bars
    from 0 hide differences of a point). The learning curves show the data loss (the train loss
    minus the penalty, for regularizers that add one), the penalty, and test accuracy apart.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_records(path)
    frame = results_frame(records)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    ok = frame[frame.status == "ok"]
    if ok.empty:
        raise ValueError(f"{path} holds no finished ('ok') run to plot ({len(frame)} failed or diverged)")
    groups = [c for c in varying_columns(ok) if c not in ("dataset", "regularizer")]
    datasets = sorted(ok.dataset.unique())
    # validation accuracy (when the runs have a validation split) in a second row, beside test
    metrics = [m for m in ("test_accuracy", "validation_accuracy", "test_r2", "validation_r2")
               if m in ok and ok[m].notna().any()]
    fig, axes = plt.subplots(len(metrics), len(datasets), figsize=(4.5 * len(datasets), 3.6 * len(metrics)),
                             squeeze=False)
    for row, metric in zip(axes, metrics):
        for ax, dataset in zip(row, datasets):
            sub = ok[ok.dataset == dataset]
            labels = sub[groups].apply(lambda r: " ".join(value_label(v) for v in r), axis=1) if groups else None
            keys = sorted(set(labels)) if groups else [""]
            regs = list(dict.fromkeys(sub.regularizer))
            width = 0.8 / len(keys)
            for j, key in enumerate(keys):
                part = sub if not groups else sub[labels == key]
                scale = 100 if "accuracy" in metric else 1  # accuracy in percent, R^2 as it is
                means = [scale * part[part.regularizer == r][metric].mean() for r in regs]
                errs = [scale * part[part.regularizer == r][metric].std(ddof=0) for r in regs]
                ax.errorbar(np.arange(len(regs)) + j * width, means, yerr=errs, fmt="o", capsize=3, label=key or None)
            ax.set_xticks(np.arange(len(regs)) + 0.4 - width / 2, regs, rotation=30)
            ax.grid(axis="y", alpha=0.3)  # the axis is zoomed to the dots: read values off the grid
            ax.set_title(dataset)
            unit = " %" if "accuracy" in metric else ""
            ax.set_ylabel(f"{metric.replace('_', ' ').replace('r2', 'R^2')}{unit} (mean +- std over seeds)")
            if groups:
                ax.legend(fontsize=7, title=" ".join(groups), title_fontsize=7)
    fig.tight_layout()
    written.append(save_figure(fig, out_dir / "accuracy_by_regularizer.png", dpi=120))

    records = [r for r in records if r["status"] == "ok"]
    score = "test_accuracy" if "test_accuracy" in metrics or "test_r2" not in metrics else "test_r2"
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    curves = {}
    for r in records:  # one curve per dataset, regularizer and strength (a tuning grid is not averaged)
        row = flat_row(r)
        key = (row["dataset"], row["regularizer"], row["strength"])
        if isinstance(r.get("curves"), dict):  # rows written without curves have no learning curve
            curves.setdefault(key, []).append(r["curves"])
    several = {(d, g) for d, g, _ in curves if sum(k[:2] == (d, g) for k in curves) > 1}
    for (dataset, reg, strength), runs in sorted(curves.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)):
        label = f"{dataset} {reg}" + (f" lambda {value_label(float(strength))}" if (dataset, reg) in several else "")
        for ax, metric in zip(axes, ("data_loss", "penalty", score)):
            values = [_curve(c, metric) for c in runs]
            values = [v for v in values if v is not None]
            if metric == "penalty" and not any(np.nanmax(np.abs(v), initial=0) > 0 for v in values):
                continue  # no penalty (none, weight decay, spectral norm): nothing to draw
            if values:  # runs of different lengths (early stopping): NaN after each one's end
                length = max(len(v) for v in values)
                values = np.stack([np.pad(v, (0, length - len(v)), constant_values=np.nan) for v in values])
                ax.plot(np.arange(1, values.shape[1] + 1), np.nanmean(values, axis=0), label=label)
    for ax, metric in zip(axes, ("data loss (train loss without the penalty)", "penalty (lambda x terms)",
                                 "test accuracy" if score == "test_accuracy" else "test R^2")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
    if axes[2].get_legend_handles_labels()[0]:  # rows written without curves draw none
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    written.append(save_figure(fig, out_dir / "learning_curves.png", dpi=120))
    return written
