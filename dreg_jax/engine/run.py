r"""One training run, end to end, as a pure function: loops over epochs and steps.

The epoch loop is a ``while_loop`` with the static cap ``TrainConfig.epochs`` and the run's own
count ``RunHParams.epochs`` (traced; a ``lax.scan`` when no run has a count of its own); the step loop is a ``lax.scan``, or a ``while_loop`` with a
traced count on padded data (:mod:`dreg_jax.engine.buckets`), so runs of different lengths and
datasets of different shapes share one program.

``train_run(hparams, data, config, num_classes, options)`` depends on the run only through
``hparams`` (seed, learning rate, strength, data fraction, label noise, input noise), all
scalar arrays, so ``jax.vmap`` over a batch of them compiles a whole grid of runs with the
same structure (``config``, dataset shapes) into one XLA program.

Per run, from its seed key: the initialization, a stratified training-fraction mask
(:func:`dreg_jax.data.stratified_fraction_mask`), symmetric label noise at ``label_noise``,
fixed Gaussian input noise of std ``input_noise`` on the training inputs, the per-epoch
shuffles and the probes. Every run takes the same number of optimizer steps,
``epochs * ceil(n_train / batch_size)`` (``epochs``: ``RunHParams.epochs``, traced, at most the
program's ``TrainConfig.epochs``): a run on a fraction cycles through its included
examples in a fresh random order each epoch (same compute budget for every fraction).

A run whose loss or gradient becomes non-finite is marked with the first such step
(``fail_step``, -1 when none); the other runs of the grid are unaffected.

A run **diverges** (``diverge_step``, -1 when none) at the first step whose training data loss
(cross-entropy, penalty excluded) exceeds

.. math:: \text{DIVERGENCE_FACTOR} \cdot \max(\log C,\; \ell_0),

ten times the worse of chance level (:math:`\log C` for ``C`` classes; 1 for a regression,
whose standardized target's mean predicts it with loss 1:
:func:`dreg_jax.training.tasks.reference_loss`) and the run's own first-step data loss: a run that learned nothing stays near :math:`\log C`, one whose updates
blow up (e.g. learning rate 1e6) passes :math:`10 \log C` within a few steps while its loss
stays finite. Sweeps record such runs with status ``diverged``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dreg_jax.engine.buckets import DataSizes, prefix_draw, unpadded_init
from dreg_jax.engine.scarcity import stratified_fraction_mask, symmetric_label_noise
from dreg_jax.engine.diagnostics import gradient_tail_ratio, tail_ratio, volatility
from dreg_jax.training.config import TrainConfig
from dreg_jax.training.fit import check_labels, check_targets
from dreg_jax.training.tasks import finish_metrics, reference_loss, score_name
from dreg_jax.training.train import balanced_class_weights, create_train_state, eval_step, train_step


DIVERGENCE_FACTOR = 10.0


class RunHParams(NamedTuple):
    """Numeric per-run values; each a scalar (or a leading run axis when vmapped). Build it by
    keyword: ``RunHParams(seed=0, learning_rate=1e-3, strength=0.01)`` (full data, no noise).

    ``activation_index``/``regularizer_index`` pick the run's activation and regularizer in a
    folded program (``TrainConfig.fold``); 0 otherwise.
    """

    seed: jax.Array
    learning_rate: jax.Array
    strength: jax.Array = 0.0
    data_fraction: jax.Array = 1.0
    label_noise: jax.Array = 0.0
    input_noise: jax.Array = 0.0
    activation_index: jax.Array = 0
    regularizer_index: jax.Array = 0
    # the run's epoch count, at most the program's TrainConfig.epochs (the static cap of its
    # while_loop); None: the config's. Runs of different lengths share one program.
    epochs: jax.Array | None = None

    def validate(self) -> "RunHParams":
        """Checks concrete values: finite, learning rate > 0, strength >= 0, fraction in (0, 1]."""
        values = {f: np.asarray(getattr(self, f), np.float64) for f in self._fields if getattr(self, f) is not None}
        for name, v in values.items():
            if not np.isfinite(v).all():
                raise ValueError(f"RunHParams.{name} must be finite, got {getattr(self, name)}")
        checks = (("learning_rate", values["learning_rate"] > 0, "> 0"),
                  ("strength", values["strength"] >= 0, ">= 0"),
                  ("data_fraction", (values["data_fraction"] > 0) & (values["data_fraction"] <= 1), "in (0, 1]"),
                  ("label_noise", (values["label_noise"] >= 0) & (values["label_noise"] < 1), "in [0, 1)"),
                  ("input_noise", values["input_noise"] >= 0, ">= 0"),
                  ("seed", (values["seed"] >= 0) & (values["seed"] < 2**32) & (values["seed"] % 1 == 0),
                   "an integer in [0, 2**32)"),
                  ("activation_index", (values["activation_index"] >= 0) & (values["activation_index"] % 1 == 0),
                   "an integer >= 0"),
                  ("regularizer_index", (values["regularizer_index"] >= 0) & (values["regularizer_index"] % 1 == 0),
                   "an integer >= 0"),
                  ("epochs", (values.get("epochs", 1) >= 1) & (values.get("epochs", 1) % 1 == 0), "an integer >= 1"))
        for name, ok, rule in checks:
            if not np.all(ok):
                raise ValueError(f"RunHParams.{name} must be {rule}, got {getattr(self, name)}")
        return self

    @classmethod
    def stack(cls, rows) -> "RunHParams":
        rows = list(rows)
        ints = {"seed": jnp.uint32, "activation_index": jnp.int32, "regularizer_index": jnp.int32,
                "epochs": jnp.int32}
        given = {f: [getattr(r, f) for r in rows] for f in cls._fields}
        if any(e is None for e in given["epochs"]):
            if any(e is not None for e in given["epochs"]):
                raise ValueError("RunHParams.stack: give every run its epochs, or none (the config's)")
            given["epochs"] = None
        return cls(**{f: None if v is None else jnp.asarray(v, ints.get(f, jnp.float32)) for f, v in given.items()})

    def check_fold(self, config: TrainConfig) -> "RunHParams":
        """Every index within the config's fold (one choice each when not folded)."""
        for name, choices in (("activation_index", config.activations),
                              ("regularizer_index", config.regularizers)):
            index = np.asarray(getattr(self, name))
            if np.any(index >= len(choices)):
                raise ValueError(f"RunHParams.{name} must be < {len(choices)} (the program holds "
                                 f"{list(choices)}), got {getattr(self, name)}")
        if self.epochs is not None and np.any(np.asarray(self.epochs) > config.epochs):
            raise ValueError(f"RunHParams.epochs must be <= TrainConfig.epochs={config.epochs} (the program's "
                             f"epoch cap), got {np.asarray(self.epochs).tolist()}")
        return self


class EngineData(NamedTuple):
    """Arrays shared by every run of a group (never vmapped)."""

    x_train: jax.Array  # (n, d) float32
    y_train: jax.Array  # (n,) int32 class labels, or float32 targets (TrainConfig.task "regression")
    x_test: jax.Array  # (m, d)
    y_test: jax.Array  # (m,)
    x_robust: jax.Array | None = None  # (sets, m, d) perturbed copies of x_test (labels y_test)
    x_val: jax.Array | None = None  # (v, d) validation split (None or 0 rows: not evaluated)
    y_val: jax.Array | None = None
    # padded data (a shape bucket): the true sizes, traced (dreg_jax.engine.buckets); None:
    # the arrays are the data's own shapes
    sizes: DataSizes | None = None

    def check(self, num_classes: int, task: str = "classification") -> "EngineData":
        """Eager checks before compiling: shapes, finite features, labels in [0, num_classes)
        (classification) or finite float targets and ``num_classes`` 1, the one output
        (regression).

        Padded data (``sizes``) are checked by :func:`dreg_jax.engine.buckets.pad_engine_data`,
        which pads checked data."""
        if self.sizes is not None:
            return self
        regression = task == "regression"
        if regression and num_classes != 1:
            raise ValueError(f"a regression run has one output: pass num_classes=1, got {num_classes!r}")
        if not regression and (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
                               or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        splits = [("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)]
        if self.x_val is not None:
            splits.append(("validation", self.x_val, self.y_val))
        width = None
        for split, x, y in splits:
            x, y = np.asarray(x), np.asarray(y)
            if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
                raise ValueError(f"{split}: x must be (rows, features) and y (rows,), got {x.shape} and {y.shape}")
            if width is not None and x.shape[1] != width:
                raise ValueError(f"{split} has {x.shape[1]} features, train has {width}")
            width = x.shape[1]
            if not np.issubdtype(x.dtype, np.floating):
                raise TypeError(f"x_{split} must be floating, got {x.dtype}; cast it (x.astype(np.float32))")
            bad = np.argwhere(~np.isfinite(x))
            if bad.size:
                raise ValueError(f"x_{split} has {len(bad)} NaN/inf value(s), the first at row {bad[0][0]}, "
                                 f"column {bad[0][1]}; clean or impute the data first")
            if regression:
                check_targets(y, f"y_{split}")
            else:
                check_labels(y, num_classes, f"y_{split}")
        if len(np.asarray(self.x_train)) == 0:
            raise ValueError("x_train has no rows")
        return self


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    diag_size: int = 128  # evaluation examples for the per-example gradient diagnostics
    per_epoch_diagnostics: bool = True  # tau and Jacobian terms every epoch (else final only)
    # Runs per compiled call (None: per backend, grid.DEFAULT_VMAP_WIDTH; 8 on a CPU). Every
    # call has exactly this vmap width (the last block padded), so a run's bits depend only on
    # its config, the backend and this width, never on chunking, grouping or resume point.
    vmap_width: int | None = None
    # Which runs share a program: "auto" (cost model per backend), "none", "all"; see
    # dreg_jax.engine.grouping.
    fold: str = "auto"
    # fold="activations": the activations every program holds (see dreg_jax.engine.grouping)
    fold_activations: tuple = ()
    # Which datasets of a sweep share a program, padded to one shape bucket
    # (dreg_jax.engine.buckets): "auto" (cost model per backend), "none" (every dataset at its
    # own shapes), "all" (every dataset that may be padded, in one bucket). Bits differ from an
    # unpadded run by float rounding only; see dreg_jax.engine.grouping.plan_buckets.
    shape_buckets: str = "auto"
    # Also return each run's trained variables (final["variables"]: {"params", "batch_stats"},
    # a leading run axis), e.g. to keep the model (dreg_jax.saved_model). Off by default: a
    # sweep records metrics only, and the parameters of a wide grid can be large.
    return_variables: bool = False
    # Early stopping on validation: every epoch scores the validation split, the parameters of
    # the best epoch (highest validation score: accuracy, or R^2 for a regression; ties keep the earlier) are kept, and the
    # final metrics (test, robust, tau, variables) are those of the best epoch; curves gain
    # validation_<score>/validation_loss and final gains best_epoch (1-based). Needs x_val.
    restore_best_epoch: bool = False
    # Early stopping with patience (needs restore_best_epoch): a run stops once ``patience``
    # epochs in a row have not improved its best validation score (config.epochs is then the
    # cap). Curves keep config.epochs entries; those after the stop are NaN, and final gains
    # epochs_run. A vmapped block runs until its last run stops (a stopped run's state is frozen),
    # so the saving is largest with narrow blocks (one run per call on a CPU).
    patience: int | None = None


def run_keys(seed):
    """The run's named PRNG keys: (init, mask, label noise, input noise, loop)."""
    return jax.random.split(jax.random.key(seed), 5)


def training_mask(seed: int, labels, fraction: float, num_classes: int) -> np.ndarray:
    """The exact training subset a run with this seed and fraction uses (for classical baselines)."""
    return np.asarray(stratified_fraction_mask(run_keys(seed)[1], jnp.asarray(labels), fraction, num_classes))


def _masked_mean(values, count):
    """Mean of the first ``count`` entries (all of them when ``count`` is their static length)."""
    if isinstance(count, int) and count == values.shape[0]:
        return values.mean()
    return jnp.sum(jnp.where(jnp.arange(values.shape[0]) < count, values, 0.0)) / count


#: Rows per evaluation chunk of a padded program: a padded split is scored chunk by chunk up
#: to its true row count (a while_loop with a traced count), so the padding rows cost at most
#: one chunk, not a pass over the bucket.
EVAL_CHUNK = 256


def evaluate_rows(state, x, y, rows, config):
    """:func:`eval_step` over the first ``rows`` (traced) of ``x``, in chunks of
    :data:`EVAL_CHUNK`: the metrics are the unpadded batch's (the chunks' sums over their real
    rows, divided by ``rows`` at the end, then :func:`dreg_jax.training.tasks.finish_metrics`;
    the last chunk is clamped into the array and counts only its new rows)."""
    total = x.shape[0]
    chunk = min(EVAL_CHUNK, total)
    shapes = jax.eval_shape(lambda: eval_step(state, {"x": x[:chunk], "y": y[:chunk],
                                                      "weights": jnp.ones(chunk, jnp.float32)}, config))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(loop):
        sums, i = loop
        first = i * chunk
        start = jnp.minimum(first, total - chunk)
        index = start + jnp.arange(chunk)
        weights = ((index >= first) & (index < rows)).astype(jnp.float32)
        part = eval_step(state, {"x": jax.lax.dynamic_slice_in_dim(x, start, chunk),
                                 "y": jax.lax.dynamic_slice_in_dim(y, start, chunk), "weights": weights}, config)
        return jax.tree_util.tree_map(jnp.add, sums, part), i + 1

    chunks = (rows + chunk - 1) // chunk
    sums, _ = jax.lax.while_loop(lambda loop: loop[1] < chunks, body, (zeros, jnp.array(0, jnp.int32)))
    means = jax.tree_util.tree_map(lambda v: v / jnp.asarray(rows, jnp.float32), sums)
    sq_norms = means.pop("jacobian_sq_norms")
    return {**finish_metrics(means, config.task), "jacobian_sq_norms": sq_norms}


def _score(state, x, y, rows, config):
    """eval_step on a split: whole when unpadded (``rows`` None), chunked up to its true rows
    when padded."""
    if rows is not None:
        return evaluate_rows(state, x, y, rows, config)
    return eval_step(state, {"x": x, "y": y}, config)


def _evaluate(state, data: EngineData, config, options, with_tau: bool, test_rows):
    ev = _score(state, data.x_test, data.y_test, test_rows, config)
    score = score_name(config.task)
    out = {f"test_{score}": ev[score], "test_loss": ev["loss"], "jacobian_sq_norms": ev["jacobian_sq_norms"]}
    if with_tau and config.task == "classification":  # tau's pseudo-labels are classes (tasks module docs)
        out.update(_tau(state, data, options, test_rows))
    return out


def _tau(state, data: EngineData, options, test_rows):
    diag_x = data.x_test[: options.diag_size]
    count = None if test_rows is None else jnp.minimum(test_rows, diag_x.shape[0])
    return {"tau": gradient_tail_ratio(state, diag_x, count=count),
            "tau_input": gradient_tail_ratio(state, diag_x, variant="input", count=count)}


def _epoch_loop(one_epoch, carry, epoch_keys, epochs, patience):
    """Epochs ``0 .. epochs - 1`` of ``one_epoch`` (a ``while_loop`` with the static cap
    ``len(epoch_keys)``; ``epochs`` may be traced). With ``patience`` it also stops once that
    many epochs in a row have not improved the best validation score (``carry[1]``: params,
    batch_stats, best score, best epoch index, epochs done). Returns ``(carry, curves,
    epochs_run)``; the curves have one entry per key, NaN (or -1) past the run's end."""
    cap = epoch_keys.shape[0]
    if patience is None and isinstance(epochs, int) and epochs == cap:
        # every run trains the cap (no traced length): the plain scan, which compiles faster
        carry, curves = jax.lax.scan(one_epoch, carry, epoch_keys)
        return carry, curves, jnp.asarray(cap, jnp.int32)
    shapes = jax.eval_shape(one_epoch, carry, epoch_keys[0])[1]
    curves0 = jax.tree_util.tree_map(
        lambda s: jnp.full((cap, *s.shape), jnp.nan if jnp.issubdtype(s.dtype, jnp.floating) else -1, s.dtype), shapes)

    def go_on(loop):
        carry, _, done = loop
        more = done < epochs
        if patience is not None:
            best_index = carry[1][3]
            more = more & (done - 1 - best_index < patience)
        return more

    def epoch(loop):
        carry, curves, done = loop
        carry, row = one_epoch(carry, epoch_keys[done])
        return carry, jax.tree_util.tree_map(lambda c, r: c.at[done].set(r), curves, row), done + 1

    carry, curves, done = jax.lax.while_loop(go_on, epoch, (carry, curves0, jnp.array(0, jnp.int32)))
    return carry, curves, done


def _step_loop(one_step, carry, idx, keys, steps):
    """The first ``steps`` (may be traced) of ``one_step`` over ``(idx[s], keys[s])``; returns
    ``(carry, outputs)`` with outputs stacked over the static ``len(idx)`` (unrun steps: 0)."""
    total = idx.shape[0]
    if isinstance(steps, int) and steps == total:
        return jax.lax.scan(one_step, carry, (idx, keys))
    shapes = jax.eval_shape(one_step, carry, (idx[0], keys[0]))[1]
    outs0 = jax.tree_util.tree_map(lambda s: jnp.zeros((total, *s.shape), s.dtype), shapes)

    def body(loop):
        carry, outs, s = loop
        carry, out = one_step(carry, (idx[s], keys[s]))
        return carry, jax.tree_util.tree_map(lambda o, v: o.at[s].set(v), outs, out), s + 1

    carry, outs, _ = jax.lax.while_loop(lambda loop: loop[2] < steps, body, (carry, outs0, jnp.array(0, jnp.int32)))
    return carry, outs


def train_run(hp: RunHParams, data: EngineData, config: TrainConfig, num_classes: int,
              options: EngineOptions = EngineOptions()):
    """Trains one run; returns ``(final_metrics, per_epoch_curves)`` as dicts of arrays.

    ``config.epochs`` is the static cap of the epoch loop; the run trains ``hp.epochs``
    (default the cap). With padded data (``data.sizes``, :mod:`dreg_jax.engine.buckets`)
    ``num_classes`` is the bucket's class count and the true sizes are traced: the steps per
    epoch, ``ceil(train rows / batch_size)``, are a traced count of a ``while_loop``.
    """
    n_pad, d_pad = data.x_train.shape
    batch = config.batch_size
    steps_cap = math.ceil(n_pad / batch)
    padded = data.sizes is not None
    if padded:
        sizes = data.sizes
        n, classes, test_rows, val_rows = sizes.train_rows, sizes.classes, sizes.test_rows, sizes.val_rows
        steps = (n + batch - 1) // batch
    else:  # rows None: every row is real
        n, classes, test_rows, val_rows, steps = n_pad, num_classes, None, None, steps_cap
    epochs = config.epochs if hp.epochs is None else hp.epochs
    k_init, k_mask, k_label, k_noise, k_loop = run_keys(hp.seed)
    state = create_train_state(config, k_init, d_pad, num_classes, learning_rate=hp.learning_rate,
                               strength=hp.strength, total_steps=epochs * steps,
                               activation_index=hp.activation_index, regularizer_index=hp.regularizer_index)
    if padded:
        params, batch_stats = unpadded_init(state.params, state.batch_stats, sizes)
        state = state.replace(params=params, batch_stats=batch_stats, num_classes=classes,
                              opt_state=state.tx.init(params))
    regression = config.task == "regression"
    # a regression target has no classes: its fraction is drawn from all rows as from one class
    strata = jnp.zeros(n_pad, jnp.int32) if regression else data.y_train
    mask = stratified_fraction_mask(k_mask, strata, hp.data_fraction, 1 if regression else num_classes,
                                    rows=n if padded else None)
    num_included = jnp.sum(mask)
    # label noise flips classes (a regression spec refuses label_noise > 0: RunSpec.validate)
    y_train = data.y_train if regression else symmetric_label_noise(k_label, data.y_train, hp.label_noise, classes)
    if padded:  # the unpadded run's draws (threefry counts flat indices), zero on the padding
        noise = prefix_draw(jax.random.normal, k_noise, data.x_train.shape, sizes.features)
        noise = jnp.where(jnp.arange(n_pad)[:, None] < n, noise, 0.0)
    else:
        noise = jax.random.normal(k_noise, data.x_train.shape)
    x_train = data.x_train + hp.input_noise * noise
    class_weights = (balanced_class_weights(y_train, mask, num_classes) if config.class_weight == "balanced"
                     else None)
    score = score_name(config.task)
    positions = jnp.arange(steps_cap * batch).reshape(steps_cap, batch)

    chance = reference_loss(config.task, classes if padded else num_classes)

    def one_step(carry, inputs):
        state, prev_norm, fail_step, step, peak, first_loss, diverge_step = carry
        idx, k = inputs
        batch_data = {"x": x_train[idx], "y": y_train[idx]}
        if class_weights is not None:
            batch_data["w"] = class_weights[y_train[idx]]
        state, m = train_step(state, batch_data, k, config)
        finite = jnp.isfinite(m["loss"]) & jnp.isfinite(m["grad_norm"])
        fail_step = jnp.where((fail_step < 0) & ~finite, step, fail_step)
        first_loss = jnp.where(step == 0, m["data_loss"], first_loss)
        exploded = m["data_loss"] > DIVERGENCE_FACTOR * jnp.maximum(chance, first_loss)
        diverge_step = jnp.where((diverge_step < 0) & exploded, step, diverge_step)
        vol = volatility(m["grad_norm"], prev_norm, step)
        carry = (state, m["grad_norm"], fail_step, step + 1, jnp.maximum(peak, vol), first_loss, diverge_step)
        schedule = {k: m[k] for k in ("strength_multiplier", "representation_noise") if k in m}
        scored = {f"train_{score}": m[score]} if score in m else {}  # no per-batch R^2
        return carry, (m["loss"], scored, m["penalty"], vol, m["grad_norm"], schedule)

    restore = options.restore_best_epoch
    has_val = data.x_val is not None and data.x_val.shape[0] > 0
    if restore and not has_val:
        raise ValueError("EngineOptions.restore_best_epoch chooses the epoch on validation data: give "
                         "EngineData.x_val/y_val (validation_fraction > 0)")
    patience = options.patience
    if patience is not None and (not restore or patience < 1):
        raise ValueError(f"EngineOptions.patience={patience} stops on the validation {score}: it needs "
                         "restore_best_epoch=True and a patience of at least 1 epoch")
    def score_validation(state):
        return _score(state, data.x_val, data.y_val, val_rows, config)

    def one_epoch(carry, k_epoch):
        carry, best = carry
        k_perm, k_steps = jax.random.split(k_epoch)
        u = jax.random.uniform(k_perm, (n_pad,))
        order = jnp.argsort(jnp.where(mask, u, 2.0 + u))  # included examples first, shuffled
        idx = order[positions % num_included]
        carry, (loss, scored, pen, vol, grad_norm, schedule) = _step_loop(
            one_step, carry, idx, jax.random.split(k_steps, steps_cap), steps)
        curves = {"train_loss": _masked_mean(loss, steps), **{k: _masked_mean(v, steps) for k, v in scored.items()},
                  "penalty": _masked_mean(pen, steps), "volatility": _masked_mean(vol, steps),
                  "tau_steps": tail_ratio(grad_norm, count=steps),
                  **{k: _masked_mean(v, steps) for k, v in schedule.items()}}
        curves.update(_evaluate(carry[0], data, config, options, options.per_epoch_diagnostics, test_rows))
        if restore:
            val = score_validation(carry[0])
            curves.update({f"validation_{score}": val[score], "validation_loss": val["loss"]})
            params, batch_stats, best_val, best_epoch, epoch = best
            better = val[score] > best_val
            keep = lambda new, old: jnp.where(better, new, old)  # noqa: E731
            best = (jax.tree_util.tree_map(keep, carry[0].params, params),
                    jax.tree_util.tree_map(keep, carry[0].batch_stats, batch_stats),
                    jnp.where(better, val[score], best_val), jnp.where(better, epoch, best_epoch), epoch + 1)
        return (carry, best), curves

    carry0 = (state, jnp.zeros([], jnp.float32), jnp.array(-1, jnp.int32),
              jnp.array(0, jnp.int32), jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32),
              jnp.array(-1, jnp.int32))
    best0 = ((state.params, state.batch_stats, jnp.array(-jnp.inf, jnp.float32), jnp.array(0, jnp.int32),
              jnp.array(0, jnp.int32)) if restore else ())
    epoch_keys = jax.random.split(k_loop, config.epochs)  # a prefix of a longer cap's keys
    ((state, _, fail_step, _, peak, _, diverge_step), best), curves, epochs_run = _epoch_loop(
        one_epoch, (carry0, best0), epoch_keys, epochs, patience)
    last = epochs_run - 1
    # the last epoch's evaluation is the final one (no second copy of the eval program)
    final = {k: v[last] for k, v in curves.items()
             if k in (f"test_{score}", "test_loss", "jacobian_sq_norms", "tau", "tau_input", "tau_steps")}
    if patience is not None:
        final["epochs_run"] = epochs_run
    if restore:  # the best epoch's parameters are the run's result; that epoch scored them
        state = state.replace(params=best[0], batch_stats=best[1])
        final.update({k: v[best[3]] for k, v in curves.items()
                      if k in (f"test_{score}", "test_loss", "jacobian_sq_norms", "tau", "tau_input",
                               f"validation_{score}", "validation_loss")})
        final["best_epoch"] = best[3] + 1
    if not options.per_epoch_diagnostics and not regression:
        final.update(_tau(state, data, options, test_rows))
    n_val = val_rows if padded else 0 if data.x_val is None else data.x_val.shape[0]
    final.update(validation_share=jnp.asarray(n_val / (n + n_val), jnp.float32))
    final.update(fail_step=fail_step, diverge_step=diverge_step, volatility_peak=peak,
                 train_examples=num_included,
                 # the validation split actually scored (a user dataset carries its own split)
                 validation_rows=jnp.asarray(n_val, jnp.int32))
    if has_val and not restore:
        val = score_validation(state)
        final.update({f"validation_{score}": val[score], "validation_loss": val["loss"]})
    if options.return_variables:
        if padded:
            raise ValueError("return_variables keeps the model at the data's own shapes: do not pad its data")
        final["variables"] = {"params": state.params, "batch_stats": state.batch_stats}
    if data.x_robust is not None and data.x_robust.shape[0] > 0:
        robust = jax.vmap(lambda xr: _score(state, xr, data.y_test, test_rows, config)[score])(
            data.x_robust)
        if padded:  # padding sets score NaN and stay out of the mean
            valid = jnp.arange(robust.shape[0]) < sizes.robust_sets
            final.update({f"robust_{score}": jnp.sum(jnp.where(valid, robust, 0.0)) / sizes.robust_sets,
                          f"robust_{score}_per_set": jnp.where(valid, robust, jnp.nan)})
        else:
            final.update({f"robust_{score}": robust.mean(), f"robust_{score}_per_set": robust})
    return final, curves
