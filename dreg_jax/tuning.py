r"""Choose a regularizer's strength on validation data: :func:`tune`.

The grid is log-spaced around the regularizer's default,
:math:`\lambda_k = \lambda_{default} \cdot 10^{\,d (2k/(K-1) - 1)}`, :math:`k = 0..K-1`
(``points=K``, ``decades=d``), optionally times learning rates, times seeds. Every run of the grid
trains in one compiled program (the strength and the learning rate are traced per run).

The pick is the strength (and learning rate) with the best **mean validation score over
seeds** (accuracy, or :math:`R^2` for a regression: :mod:`dreg_jax.training.tasks`); ties go to the smaller strength, then the smaller learning rate. When the pick lies on
an edge of the grid and is strictly better than its neighbour, the grid is extended one step
past that edge and the new points are trained (at most ``max_extensions`` times), so a pick on
the edge means the curve is flat there, not that the grid stopped.

With ``keep_model`` (the default) the result also holds the model trained at the pick with the
first seed (:attr:`TuneResult.model`, a :class:`dreg_jax.saved_model.TrainedModel`: ``.save(dir)``
keeps it, ``.predict_csv(path)`` uses it).

Test data never enters: the runs are evaluated on the validation split only (the engine's test
arrays are replaced by the validation arrays before anything trains). Where the validation split
is too small to tell the grid's points apart (the best and the runner-up differ by less than one
validation example), :attr:`TuneResult.note` says so.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from dreg_jax._files import save_figure

from dreg_jax.engine import EngineData, EngineOptions, RunHParams, train_many
from dreg_jax.saved_model import TrainedModel
from dreg_jax.training.config import TrainConfig
from dreg_jax.training.regularizers import get_regularizer
from dreg_jax.training.tasks import SCORE_DISPLAY, score_name, show_score


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` found.

    Attributes:
      regularizer: the regularizer kind tuned.
      rows: one dict per (strength, learning rate): ``strength, learning_rate, mean, std,
        seeds`` (the validation score over seeds), ``diverged`` (its runs that diverged or failed:
        such a point is never the pick), in strength order.
      strength, learning_rate: the pick.
      extensions: how many times the grid was extended past an edge.
      validation_rows: the validation split's size (accuracy moves in steps of its inverse).
      note: empty, or why the pick should be read with care.
      model: the pick's first-seed model (``keep_model``), a ``TrainedModel``.
      on_edge: the pick is still strictly best on an edge of the grid after every extension.
      pick_variables: ``{seed: variables}`` of the runs at the pick (``keep_model`` with one
        validation split): :func:`held_out_comparison` scores these instead of training again.
      score: what ``rows`` hold: ``"accuracy"`` or ``"r2"`` (a regression).
    """

    regularizer: str
    rows: tuple
    strength: float
    learning_rate: float
    extensions: int
    validation_rows: int
    note: str = ""
    model: object = dataclasses.field(default=None, compare=False, repr=False)
    on_edge: bool = False  # the pick is strictly best on an edge even after the extensions
    pick_variables: dict = dataclasses.field(default=None, compare=False, repr=False)
    score: str = "accuracy"

    def to_dict(self) -> dict:
        """JSON-able fields (the model is saved with ``model.save(dir)``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("model", "pick_variables")}

    def table(self) -> str:
        """A markdown table of the validation score (mean +- std over seeds) per grid point."""
        folds = self.rows[0].get("folds", 1) if self.rows else 1
        label = SCORE_DISPLAY[self.score][0]
        scored = f"{folds}-fold cross-validation {label}" if folds > 1 else f"validation {label}"
        lines = [f"| strength | learning rate | {scored} | seeds |", "|---|---|---|---|"]
        for r in self.rows:
            mark = " **(pick)**" if (r["strength"], r["learning_rate"]) == (self.strength, self.learning_rate) else ""
            broken = f" ({r['diverged']} diverged: not eligible)" if r.get("diverged") else ""
            lines.append(f"| {r['strength']:.3g} | {r['learning_rate']:.3g} | {show_score(r['mean'], self.score)} +- "
                         f"{show_score(r['std'], self.score)}{mark}{broken} | {r['seeds']} |")
        return "\n".join(lines)

    def plot(self, path):
        """:func:`plot_tuning` of this result alone."""
        return plot_tuning([self], path)


def plot_tuning(results, path):
    """The validation score (accuracy, or :math:`R^2`) against strength (mean and spread over
    seeds), one line per regularizer and learning rate; each pick circled. Needs matplotlib
    (the study extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    label, scale = SCORE_DISPLAY[results[0].score] if results else SCORE_DISPLAY["accuracy"]
    for result in results:
        for lr in sorted({r["learning_rate"] for r in result.rows}):
            rows = [r for r in result.rows if r["learning_rate"] == lr]
            if all(r["strength"] == 0 for r in rows):  # no strength (none, SN): a level to compare with
                (row,) = rows
                line = ax.axhline(scale * row["mean"], ls="--", label=f"{result.regularizer}, lr {lr:g} (no strength)")
                ax.axhspan(scale * (row["mean"] - row["std"]), scale * (row["mean"] + row["std"]), alpha=0.1,
                           color=line.get_color())
                continue
            s = np.array([r["strength"] for r in rows])
            m = np.array([scale * r["mean"] for r in rows])
            sd = np.array([scale * r["std"] for r in rows])
            (line,) = ax.plot(s, m, marker="o", label=f"{result.regularizer}, lr {lr:g}")
            ax.fill_between(s, m - sd, m + sd, alpha=0.2, color=line.get_color())
            if lr == result.learning_rate:
                pick = next(r for r in rows if r["strength"] == result.strength)
                ax.plot([pick["strength"]], [scale * pick["mean"]], "o", ms=12, mfc="none", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("strength")
    ax.set_ylabel(f"validation {label}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def strength_grid(regularizer: str, points: int = 5, decades: float = 2.0) -> tuple[float, ...]:
    """``points`` log-spaced strengths, ``decades`` either side of the regularizer's default."""
    default = get_regularizer(regularizer).default_strength
    if default is None:
        raise ValueError(f"regularizer {regularizer!r} has no strength to tune")
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    return tuple(float(default * 10 ** e) for e in np.linspace(-decades, decades, points))


def choose(accuracy: dict, near: float | None = None) -> tuple[float, float]:
    """``(strength, learning_rate)`` with the best mean over seeds of ``accuracy[(s, lr)]``
    (lists of per-seed validation accuracies; NaNs ignored, a point without any finite value
    ranks last). Ties go to the strength nearest ``near`` on a log scale (when given), then to
    the smaller strength, then to the smaller learning rate.

    The one implementation of "choose on validation": :func:`tune` and the DREG study's fair
    protocol (which passes the paper's strength as ``near``) both call it.
    """
    def score(key):
        values = np.asarray(accuracy[key], np.float64)
        mean = float(np.nanmean(values)) if np.isfinite(values).any() else -np.inf
        s, lr = key
        distance = abs(math.log10(s / near)) if s and near else 0.0
        return mean, -distance, -s, -lr

    return max(sorted(accuracy), key=score)


def edge_extension(accuracy: dict, step: float) -> float | None:
    """The strength to add when :func:`choose`'s pick lies on an edge of the strengths tried and
    is strictly better than its neighbour (same learning rate): one ``step`` (in decades) past
    that edge. None when the pick is inside the grid, or the curve is flat at the edge.
    Shared by :func:`tune` and the DREG study v3, so both extend a grid by the same rule."""
    best = choose(accuracy)
    strengths = sorted({s for s, _ in accuracy})
    if len(strengths) < 2:
        return None
    i = strengths.index(best[0])
    if i not in (0, len(strengths) - 1):
        return None
    neighbour = strengths[1] if i == 0 else strengths[-2]
    if (neighbour, best[1]) not in accuracy:
        return None
    if not np.nanmean(accuracy[best]) > np.nanmean(accuracy[(neighbour, best[1])]):
        return None
    return best[0] * 10 ** (-step if i == 0 else step)


def stratified_folds(y, folds: int, seed: int = 0) -> list:
    """``folds`` disjoint index arrays covering every row of ``y``, each class dealt round-robin
    (in a seeded random order) so every fold holds its share of every class (sizes differ by at
    most one row per class)."""
    y = np.asarray(y)
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    counts = np.bincount(y)
    short = [(c, int(n)) for c, n in enumerate(counts) if 0 < n < folds]
    if short:
        raise ValueError(f"class(es) {short[:5]} (class, rows) have fewer rows than folds={folds}: every fold "
                         "needs a row of every class; use fewer folds")
    rng = np.random.default_rng(seed)
    parts, start = [[] for _ in range(folds)], 0
    for c in np.flatnonzero(counts):
        rows = rng.permutation(np.flatnonzero(y == c))
        for i, row in enumerate(rows):
            parts[(start + i) % folds].append(row)
        start = (start + len(rows)) % folds  # the next class starts where this one stopped: sizes balance
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def tune(data, config: TrainConfig, num_classes: int | None = None, *, strengths=None, learning_rates=None,
         seeds=3, max_extensions: int = 2, options: EngineOptions | None = None, keep_model: bool = True,
         preprocessing=None, folds: int = 1) -> TuneResult:
    """Chooses ``config``'s regularizer strength (and optionally the learning rate) on validation.

    Args:
      data: a ``Dataset`` (``from_csv``/``from_arrays``/``load_dataset``; its class count and
        preprocessing are taken from it) or the engine's arrays (``EngineData``);
        ``x_val``/``y_val`` must hold a validation split. The test arrays are never used.
      config: the run's config; its ``regularizer.kind`` is tuned (its ``strength`` is ignored).
      num_classes: number of classes (default: the Dataset's).
      strengths: the grid (default :func:`strength_grid`: 5 points over +-2 decades).
      learning_rates: learning rates to try with every strength (default: the config's).
      seeds: number of seeds (``0..seeds-1``) or a sequence of seeds.
      max_extensions: how often an edge pick may extend the grid.
      options: the runs' ``EngineOptions`` (default: final diagnostics only); e.g.
        ``EngineOptions(restore_best_epoch=True, patience=5)`` scores every grid point at its best
        validation epoch and stops each run after 5 epochs without improvement. ``tune`` sets
        its ``vmap_width`` (seeds x learning rates: extensions reuse the program) and
        ``return_variables`` (``keep_model``).
      keep_model: keep the variables of the best grid point's runs so far (the others' are
        dropped after each round), and return the pick's first-seed one as
        :attr:`TuneResult.model` and every seed's as :attr:`TuneResult.pick_variables`.
      preprocessing: ``Dataset.preprocessing`` of the data (user tables), stored with the model.
      folds: ``K > 1``: stratified K-fold cross-validation instead of one validation split: the
        training and validation rows are pooled and split by :func:`stratified_folds` (a
        regression's rows at random: one stratum); every grid
        point trains on ``K - 1`` folds and is scored on the held fold, ``K`` times, and its
        score is the mean over folds and seeds (every pooled row scored once per seed: for
        small tables, where one validation split is a handful of rows). The kept model is the
        first fold's.

    Returns:
      A :class:`TuneResult`.
    """
    if not isinstance(data, EngineData):  # a Dataset: its arrays, class count and preprocessing
        if not all(hasattr(data, a) for a in ("x_train", "y_train", "x_val", "y_val", "num_classes", "robust")):  # noqa: E501
            raise TypeError(f"data must be a Dataset or an EngineData, got {type(data).__name__}")
        from dreg_jax.engine import dataset_engine_data  # the sweep layer (a Dataset needs the study extra)

        preprocessing = preprocessing if preprocessing is not None else getattr(data, "preprocessing", None)
        task = getattr(data, "task", "classification")
        if task != config.task:
            raise ValueError(f"the data is a {task} dataset and config.task is {config.task!r}: set "
                             f"TrainConfig(task={task!r})")
        num_classes = num_classes or data.num_classes
        data = dataset_engine_data(data)
    if num_classes is None:
        raise ValueError("pass num_classes with EngineData (a Dataset carries its own)")
    kind = config.regularizer.kind
    if get_regularizer(kind).default_strength is None:  # none, spectral norm: the learning rates only
        if strengths is not None:
            raise ValueError(f"regularizer {kind!r} has no strength to tune; leave strengths unset "
                             "(its learning_rates are still chosen)")
        grid = [0.0]
    else:
        grid = sorted(float(s) for s in (strengths if strengths is not None else strength_grid(kind)))
        if len(grid) < 2 or grid[0] <= 0:
            raise ValueError(f"strengths must be >= 2 positive values, got {grid}")
    lrs = tuple(float(lr) for lr in (learning_rates or (config.optimizer.learning_rate,)))
    seeds = tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds)
    folds = int(folds)
    if folds > 1:  # the training and validation rows pooled, K stratified folds
        has_val = data.x_val is not None and len(data.x_val) > 0
        pool_x = np.concatenate([np.asarray(data.x_train)] + ([np.asarray(data.x_val)] if has_val else []))
        pool_y = np.concatenate([np.asarray(data.y_train)] + ([np.asarray(data.y_val)] if has_val else []))
        regression = config.task == "regression"
        parts = stratified_folds(np.zeros(len(pool_y), np.int64) if regression else pool_y, folds)
        fold_data = []
        for part in parts:
            rest = np.setdiff1d(np.arange(len(pool_y)), part)  # the other folds: trained on
            fold_data.append(data._replace(x_train=pool_x[rest], y_train=pool_y[rest], x_test=pool_x[part],
                                           y_test=pool_y[part], x_val=pool_x[part], y_val=pool_y[part],
                                           x_robust=None))
        n_val = len(pool_y)
    else:
        if data.x_val is None or len(data.x_val) == 0:
            raise ValueError("tune chooses on a validation split, and this data has none: use "
                             "validation_fraction > 0 (from_csv / from_arrays / load_dataset), or folds=K")
        # the test split never enters: the runs are scored on the validation rows only
        fold_data = [data._replace(x_test=data.x_val, y_test=data.y_val, x_robust=None)]
        n_val = len(data.y_val)
    config = dataclasses.replace(config, regularizer=dataclasses.replace(config.regularizer, strength=None))
    options = options or EngineOptions(per_epoch_diagnostics=False)
    options = dataclasses.replace(options, vmap_width=len(seeds) * len(lrs),  # extensions reuse the program
                                  return_variables=keep_model)
    score = score_name(config.task)
    accuracy: dict = {}  # (strength, lr) -> validation scores (accuracy or R^2), one per seed and fold
    broken: dict = {}  # (strength, lr) -> [(seed, step, "failed" | "diverged"), ...]
    kept: dict = {}

    def train(new_strengths):
        for fold, scored in enumerate(fold_data):
            train_fold(new_strengths, scored, fold)
        # only the best point so far can be the pick: choose() is an argmax under a total order
        # (ties broken by strength, then learning rate), so a point beaten now stays beaten as
        # the grid grows. The others' variables are dropped: memory is one point's seeds.
        best = choose(scores())
        for key in [k for k in kept if k[:2] != best]:
            del kept[key]

    def train_fold(new_strengths, scored, fold):
        keys = [(s, lr, seed) for s in new_strengths for lr in lrs for seed in seeds]
        runs = RunHParams.stack([RunHParams(seed=seed, learning_rate=lr, strength=s) for s, lr, seed in keys])
        final, _ = train_many(runs, scored, config, num_classes, options)
        fail, diverge = np.asarray(final["fail_step"]), np.asarray(final["diverge_step"])
        for i, ((s, lr, seed), acc) in enumerate(zip(keys, np.asarray(final[f"test_{score}"], np.float64))):
            accuracy.setdefault((s, lr), []).append(float(acc))
            if fail[i] >= 0 or diverge[i] >= 0:
                status = "failed" if fail[i] >= 0 else "diverged"
                broken.setdefault((s, lr), []).append((seed, int(fail[i] if fail[i] >= 0 else diverge[i]), status))
            if keep_model and fold == 0:  # every seed: the held-out comparison scores the pick's runs
                kept[(s, lr, seed)] = jax.tree_util.tree_map(lambda a: np.asarray(a[i]), final["variables"])

    def scores():  # a grid point with a diverged or failed run is never the pick: it ranks last
        return {k: ([-np.inf] if k in broken else v) for k, v in accuracy.items()}

    train(grid)
    extensions = 0
    step = math.log10(grid[1] / grid[0]) if len(grid) > 1 else 0.0
    # edge_extension is None for a one-point grid (none, SN) and for a pick inside the grid
    while extensions < max_extensions and (beyond := edge_extension(scores(), step)) is not None:
        train([beyond])
        extensions += 1
    best = choose(scores())
    if best in broken:
        (seed, step_, status), = broken[best][:1]
        raise ValueError(f"{kind}: every grid point has a run that diverged or failed (e.g. strength {best[0]:.3g}, "
                         f"learning rate {best[1]:g}, seed {seed}: {status} at step {step_}); nothing to pick: "
                         "lower the learning rates or the strengths")
    rows = tuple({"strength": s, "learning_rate": lr, "mean": float(np.mean(a)), "std": float(np.std(a)),
                  "seeds": len(a) // len(fold_data), "folds": len(fold_data), "diverged": len(broken.get((s, lr), []))} for (s, lr), a in sorted(accuracy.items()))
    means = sorted((float(np.mean(a)) for k, a in accuracy.items() if k not in broken), reverse=True)
    notes = []
    if score == "accuracy" and len(means) > 1 and means[0] - means[1] < 1.0 / n_val:
        notes.append(f"the best and the runner-up differ by less than one validation example "
                     f"({n_val} rows: accuracy moves in steps of {100 / n_val:.2f} pp); the split cannot "
                     "separate them, so the pick is weak evidence")
    if broken:
        (s, lr), runs = min(broken.items())
        notes.append(f"{len(broken)} grid point(s) left out of the pick: a run diverged or failed (e.g. strength "
                     f"{s:.3g}, learning rate {lr:g}, seed {runs[0][0]}: {runs[0][2]} at step {runs[0][1]})")
    on_edge = edge_extension(scores(), step) is not None
    if on_edge:
        notes.append(f"the pick is still on the grid's edge after {extensions} extension(s); widen the grid")
    tried = sorted({k[0] for k in accuracy})
    if len(tried) > 1 and best[0] == tried[0]:
        notes.append(f"the pick is the smallest strength tried ({best[0]:.3g}): tuning switched {kind} (almost) off "
                     "on this data")
    if len(lrs) > 1 and best[1] in (min(lrs), max(lrs)):
        notes.append(f"the learning rate pick ({best[1]:g}) is on an end of its grid {list(lrs)}: a better one "
                     "may lie beyond it; widen --learning-rates")
    model = None
    if keep_model:
        run = {"seed": int(seeds[0]), "strength": best[0], "learning_rate": best[1], "tuned": True,
               f"validation_{score}": accuracy[best][0], "validation_rows": n_val}
        model = TrainedModel(dataclasses.replace(config, regularizer=dataclasses.replace(
            config.regularizer, strength=best[0]), optimizer=dataclasses.replace(
            config.optimizer, learning_rate=best[1])), kept[(*best, seeds[0])], num_classes,
            int(fold_data[0].x_train.shape[1]), preprocessing, run)
    # K folds train each run on part of the training rows: those are not the pick's final models
    pick_variables = {seed: kept[(*best, seed)] for seed in seeds} if keep_model and folds == 1 else None
    return TuneResult(kind, rows, best[0], best[1], extensions, n_val, "; ".join(notes), model, on_edge,
                      pick_variables, score)


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Every tuned arm at its pick, scored on the held-out rows (:func:`held_out_comparison`).

    Attributes:
      rows: one dict per arm: ``regularizer, strength, learning_rate`` and, as mean and std over
        seeds, ``accuracy, balanced_accuracy, macro_f1, log_loss, auc`` (binary AUC, or the macro
        one-vs-rest AUC; None where a class is missing from the held-out rows); a regression's
        ``r2, rmse, mae`` (RMSE and MAE in the target's units when the preprocessing record is
        known, else in standardized units: ``units``).
      comparisons: one dict per arm other than the baseline: ``regularizer, baseline,
        accuracy_diff`` and ``balanced_accuracy_diff`` (points, mean over seeds) each with a 95%
        ``[low, high]`` interval (paired bootstrap over held-out rows and seeds), ``verdict`` and
        ``sentence``; ``switched_off``: its held-out predictions equal the baseline's on every
        row and seed (tuning turned it off: the comparison then measures nothing). A
        regression's compare ``r2_diff`` with its ``r2_interval`` instead.
      held_out_rows, seeds: the held-out split's size and the seeds.
      task: ``"classification"`` or ``"regression"``; units: a regression's RMSE/MAE units.
    """

    rows: tuple
    comparisons: tuple
    held_out_rows: int
    seeds: tuple
    task: str = "classification"
    units: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def plot(self, path):
        """Each arm minus the baseline on the held-out rows: accuracy and balanced accuracy
        (points), with the 95% paired-bootstrap intervals; a dashed line at no difference."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = ((("r2", "R^2", ""),) if self.task == "regression" else
                  (("accuracy", "accuracy", " (pp)"), ("balanced_accuracy", "balanced accuracy", " (pp)")))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 0.6 * len(self.comparisons) + 1.8),
                                 squeeze=False)
        names = [c["regularizer"] for c in self.comparisons]
        for ax, (key, title, unit) in zip(axes[0], panels):
            diffs = np.array([c[f"{key}_diff"] for c in self.comparisons])
            low = np.array([c[f"{key}_interval"][0] for c in self.comparisons])
            high = np.array([c[f"{key}_interval"][1] for c in self.comparisons])
            ax.errorbar(diffs, np.arange(len(names)), xerr=[diffs - low, high - diffs], fmt="o", capsize=4)
            ax.axvline(0.0, ls="--", color="gray")
            ax.set_yticks(np.arange(len(names)), names)
            ax.set_xlabel(f"{title}: arm - {self.comparisons[0]['baseline'] if self.comparisons else 'baseline'}{unit}")
        axes[0][0].set_title(f"held-out rows: {self.held_out_rows}, seeds: {len(self.seeds)} (95% intervals)",
                             fontsize=9, loc="left")
        fig.tight_layout()
        return save_figure(fig, path, dpi=120)

    def table(self) -> str:
        metric = lambda r, k, scale=100, digits=2: ("n/a" if r[k] is None else  # noqa: E731
                                                    f"{scale * r[k]:.{digits}f} +- {scale * r[k + '_std']:.{digits}f}")
        if self.task == "regression":
            lines = [f"| regularizer | strength | learning rate | R^2 | RMSE ({self.units}) | MAE ({self.units}) |",
                     "|---|---|---|---|---|---|"]
            for r in self.rows:
                lines.append(f"| {r['regularizer']} | {r['strength']:.3g} | {r['learning_rate']:.3g} | "
                             f"{metric(r, 'r2', 1, 4)} | {metric(r, 'rmse', 1, 4)} | {metric(r, 'mae', 1, 4)} |")
            return "\n".join(lines + [""] + [c["sentence"] for c in self.comparisons])
        lines = ["| regularizer | strength | learning rate | accuracy % | balanced accuracy % | macro F1 % | "
                 "log loss | AUC % |", "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['regularizer']} | {r['strength']:.3g} | {r['learning_rate']:.3g} | "
                         f"{metric(r, 'accuracy')} | {metric(r, 'balanced_accuracy')} | {metric(r, 'macro_f1')} | "
                         f"{metric(r, 'log_loss', 1)} | {metric(r, 'auc')} |")
        return "\n".join(lines + [""] + [c["sentence"] for c in self.comparisons])


def _weighted_metrics(correct, y, weights, num_classes):
    """Accuracy and balanced accuracy of ``correct`` ``(seeds, rows)`` under row ``weights``
    ``(draws, rows)``: ``(draws, seeds)`` each."""
    accuracy = correct @ weights.T / weights.sum(1)  # (seeds, draws)
    recalls = []
    for c in range(num_classes):
        w = weights * (y == c)
        total = w.sum(1)
        recalls.append(np.where(total > 0, (correct @ w.T) / np.maximum(total, 1e-12), np.nan))
    return accuracy.T, np.nanmean(np.stack(recalls), axis=0).T


def paired_interval(correct_arm, correct_base, y, num_classes, *, draws=2000, seed=0):
    """Paired bootstrap (over held-out rows and over seeds) of arm - baseline, in points.

    ``correct_*``: ``(seeds, rows)`` booleans, seed ``s`` of both arms on the same rows. Each draw
    resamples the rows (multinomial weights) and the seeds (the same seeds for both arms: the
    pairing), and takes the difference of the seed-mean accuracy and balanced accuracy.

    Returns:
      ``{"accuracy": (diff, low, high), "balanced_accuracy": (diff, low, high)}`` in points
      (100 x), ``diff`` on the data as observed, ``[low, high]`` the 2.5% and 97.5% quantiles.
    """
    correct_arm, correct_base = np.asarray(correct_arm, float), np.asarray(correct_base, float)
    y = np.asarray(y)
    seeds, rows = correct_arm.shape
    rng = np.random.default_rng(seed)
    weights = np.vstack([np.ones(rows), rng.multinomial(rows, np.full(rows, 1.0 / rows), size=draws)])
    seed_counts = np.vstack([np.ones(seeds), rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=draws)])
    out = {}
    arm, base = _weighted_metrics(correct_arm, y, weights, num_classes), _weighted_metrics(correct_base, y, weights, num_classes)
    for name, a, b in (("accuracy", arm[0], base[0]), ("balanced_accuracy", arm[1], base[1])):
        diff = ((a - b) * seed_counts).sum(1) / seeds * 100  # (draws + 1,): the first is the data itself
        low, high = np.quantile(diff[1:], [0.025, 0.975])
        out[name] = (float(diff[0]), float(low), float(high))
    return out


def paired_r2_interval(error_arm, error_base, y, *, draws=2000, seed=0):
    r"""Paired bootstrap (over held-out rows and over seeds) of :math:`R^2_{arm} - R^2_{base}`.

    ``error_*``: ``(seeds, rows)`` prediction errors :math:`\hat y - y`, seed ``s`` of both arms on
    the same rows ``y``. Each draw resamples the rows (multinomial weights :math:`w`) and the
    seeds (the same for both arms) and takes the seed mean of
    :math:`R^2_w = 1 - \sum_i w_i e_i^2 / \sum_i w_i (y_i - \bar y_w)^2`.

    Returns:
      ``(diff, low, high)``: on the data as observed, and the 2.5% and 97.5% quantiles.
    """
    error_arm, error_base = np.asarray(error_arm, float), np.asarray(error_base, float)
    y = np.asarray(y, float)
    seeds, rows = error_arm.shape
    rng = np.random.default_rng(seed)
    weights = np.vstack([np.ones(rows), rng.multinomial(rows, np.full(rows, 1.0 / rows), size=draws)])
    seed_counts = np.vstack([np.ones(seeds), rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=draws)])
    total = weights.sum(1)
    mean = weights @ y / total
    spread = weights @ np.square(y) - total * np.square(mean)  # sum_i w_i (y_i - mean_w)^2, per draw
    spread = np.where(spread > 1e-12 * total, spread, np.nan)  # a draw of one repeated row: undefined
    r2 = lambda e: 1.0 - (np.square(e) @ weights.T) / spread  # noqa: E731 - (seeds, draws + 1)
    diff = ((r2(error_arm) - r2(error_base)).T * seed_counts).sum(1) / seeds
    low, high = np.nanquantile(diff[1:], [0.025, 0.975])
    return float(diff[0]), float(low), float(high)


def _verdict(low, high) -> str:
    return "better" if low > 0 else "worse" if high < 0 else "no reliable difference"


_SAID = {"better": "reliably better than {baseline}", "worse": "reliably worse than {baseline}",
         "no reliable difference": "no reliable difference"}


def held_out_comparison(data, config: TrainConfig, num_classes: int, results, *, seeds=3, baseline="none",
                        options: EngineOptions | None = None, draws: int = 2000, preprocessing=None) -> HeldOut:
    """Scores every tuned arm at its pick on held-out rows and compares it with the baseline.

    Each :class:`TuneResult` in ``results`` gives one model per seed at its pick (strength and
    learning rate), trained on the training rows :func:`tune` used (never the validation or
    held-out rows), and scored on ``data``'s test split, which :func:`tune` never read: the
    picks are fixed before any held-out row is seen. Where :func:`tune` kept the pick's runs
    (``keep_model`` with one validation split: :attr:`TuneResult.pick_variables`) those very
    models are scored; otherwise (K folds, or seeds it did not run) the arm is trained again at
    its pick, which gives the same runs (same seeds, rows and hyperparameters) at the cost of
    compiling and training once more.

    Args:
      data: ``EngineData`` (or a ``Dataset``) whose test split holds the held-out rows.
      config: the runs' config (its regularizer and learning rate are each arm's pick).
      num_classes: the class count.
      results: :class:`TuneResult` per arm; the ``baseline`` arm must be among them.
      seeds: number of seeds or a sequence (seed ``s`` of every arm pairs with seed ``s`` of the
        baseline).
      draws: bootstrap draws of the 95% intervals (:func:`paired_interval`; a regression's
        :func:`paired_r2_interval`).
      preprocessing: a regression's record (``Dataset.preprocessing``; default the one a
        ``Dataset`` or the tuned models carry): RMSE and MAE in the target's units.

    Returns:
      A :class:`HeldOut`.
    """
    from sklearn import metrics as skm  # noqa: PLC0415 - the study extra

    if not isinstance(data, EngineData):
        from dreg_jax.engine import dataset_engine_data  # noqa: PLC0415

        num_classes = num_classes or data.num_classes
        preprocessing = preprocessing if preprocessing is not None else getattr(data, "preprocessing", None)
        data = dataset_engine_data(data)
    if preprocessing is None:
        preprocessing = next((r.model.preprocessing for r in results if r.model is not None), None)
    if data.x_test is None or len(data.x_test) == 0:
        raise ValueError("the held-out comparison needs held-out rows (a test split); this data has none")
    arms = {r.regularizer: r for r in results}
    if baseline not in arms:
        raise ValueError(f"the baseline {baseline!r} was not tuned (arms: {sorted(arms)})")
    seeds = tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds)
    # the runs' options as in tuning (early stopping on the validation rows, if it was used)
    options = dataclasses.replace(options or EngineOptions(per_epoch_diagnostics=False),
                                  vmap_width=len(seeds), return_variables=True)
    fit = data._replace(x_robust=None)  # trained on the training rows, as tune trained them
    y = np.asarray(data.y_test)
    labels = list(range(num_classes))
    regression = config.task == "regression"
    in_units = regression and preprocessing is not None and preprocessing.target_std is not None
    unit = preprocessing.target_std if in_units else 1.0  # standardized errors -> the target's units
    rows, predicted = [], {}
    for kind, result in arms.items():
        arm_config = dataclasses.replace(
            config, regularizer=dataclasses.replace(config.regularizer, kind=kind, strength=None),
            optimizer=dataclasses.replace(config.optimizer, learning_rate=result.learning_rate))
        kept = result.pick_variables
        if kept is not None and all(s in kept for s in seeds):
            per_seed = [kept[s] for s in seeds]
        else:
            runs = RunHParams.stack([RunHParams(seed=s, learning_rate=result.learning_rate, strength=result.strength)
                                     for s in seeds])
            final, _ = train_many(runs, fit, arm_config, num_classes, options)
            per_seed = [jax.tree_util.tree_map(lambda a, i=i: np.asarray(a[i]), final["variables"])
                        for i in range(len(seeds))]
        names = ("r2", "rmse", "mae") if regression else ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "auc")
        scores = {k: [] for k in names}
        preds = []
        for variables in per_seed:
            model = TrainedModel(arm_config, variables, num_classes, int(data.x_train.shape[1]))
            if regression:  # standardized outputs against the standardized target
                error = model.logits(np.asarray(data.x_test, np.float32))[:, 0].astype(np.float64) - y
                preds.append(error)
                scores["r2"].append(float(1.0 - np.sum(error ** 2) / np.sum((y - y.mean()) ** 2)))
                scores["rmse"].append(float(unit * np.sqrt(np.mean(error ** 2))))
                scores["mae"].append(float(unit * np.mean(np.abs(error))))
                continue
            proba = model.predict_proba(np.asarray(data.x_test, np.float32))
            pred = proba.argmax(1)
            preds.append(pred)
            scores["accuracy"].append(float(np.mean(pred == y)))
            scores["balanced_accuracy"].append(float(skm.balanced_accuracy_score(y, pred)))
            scores["macro_f1"].append(float(skm.f1_score(y, pred, average="macro", labels=labels, zero_division=0)))
            scores["log_loss"].append(float(skm.log_loss(y, np.clip(proba, 1e-7, 1.0), labels=labels)))
            try:
                auc = (skm.roc_auc_score(y, proba[:, 1]) if num_classes == 2 else
                       skm.roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=labels))
                scores["auc"].append(float(auc))
            except ValueError:  # a class absent from the held-out rows: AUC is undefined
                scores["auc"].append(None)
        predicted[kind] = np.stack(preds)  # (seeds, rows): classes, or a regression's errors
        row = {"regularizer": kind, "strength": result.strength, "learning_rate": result.learning_rate}
        for k, values in scores.items():
            known = [v for v in values if v is not None]
            row[k] = float(np.mean(known)) if len(known) == len(values) else None
            row[k + "_std"] = float(np.std(known)) if len(known) == len(values) else None
        rows.append(row)
    comparisons = []
    for kind in arms:
        if kind == baseline:
            continue
        switched_off = bool(np.array_equal(predicted[kind], predicted[baseline]))
        off = (f" (switched off by tuning: its held-out predictions equal {baseline}'s on every row and seed)"
               if switched_off else "")
        if regression:
            diff, lo, hi = paired_r2_interval(predicted[kind], predicted[baseline], y, draws=draws)
            verdict = _verdict(lo, hi)
            comparisons.append({
                "regularizer": kind, "baseline": baseline, "r2_diff": diff, "r2_interval": [lo, hi],
                "verdict": verdict, "switched_off": switched_off,
                "sentence": (f"{kind}: R^2 {diff:+.4f} [{lo:+.4f}, {hi:+.4f}] vs {baseline} on your {len(y)} held-out "
                             f"rows ({len(seeds)} seeds, 95% paired bootstrap): "
                             f"{_SAID[verdict].format(baseline=baseline)}{off}")})
            continue
        interval = paired_interval(predicted[kind] == y, predicted[baseline] == y, y, num_classes, draws=draws)
        (acc, lo, hi), (bacc, blo, bhi) = interval["accuracy"], interval["balanced_accuracy"]
        verdict = _verdict(lo, hi)
        said = _SAID[verdict].format(baseline=baseline)
        comparisons.append({
            "regularizer": kind, "baseline": baseline, "accuracy_diff": acc, "accuracy_interval": [lo, hi],
            "balanced_accuracy_diff": bacc, "balanced_accuracy_interval": [blo, bhi], "verdict": verdict,
            "sentence": (f"{kind}: {acc:+.1f} pp accuracy [{lo:+.1f}, {hi:+.1f}] and {bacc:+.1f} pp balanced "
                         f"accuracy [{blo:+.1f}, {bhi:+.1f}] vs {baseline} on your {len(y)} held-out rows "
                         f"({len(seeds)} seeds, 95% paired bootstrap): {said}{off}"),
            "switched_off": switched_off,
        })
    units = ("target units" if in_units else "standardized target units") if regression else ""
    return HeldOut(tuple(rows), tuple(comparisons), len(y), seeds, config.task, units)


__all__ = ["stratified_folds", "HeldOut", "TuneResult", "choose", "edge_extension", "held_out_comparison", "paired_interval",
           "paired_r2_interval",
           "plot_tuning", "strength_grid", "tune"]
