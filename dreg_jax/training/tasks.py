r"""What a run predicts: class labels (``classification``) or a number (``regression``).

``TrainConfig.task`` names it; the data loss, the evaluation metrics, the metric that chooses
(best epoch, tuning pick) and the divergence criterion's reference loss are read from here.

* **classification**: ``C`` logits, softmax cross-entropy on integer labels; metrics accuracy and
  the mean cross-entropy (``loss``); chosen on accuracy.
* **regression**: one output :math:`\hat y`; the target is standardized with the training rows'
  mean and deviation (:class:`dreg_jax.preprocessing.Preprocessing` records them, so a saved
  model predicts in the target's own units); data loss the squared error
  :math:`(\hat y - y)^2` (its batch mean: MSE on the standardized target); metrics ``loss``
  (that MSE) and

  .. math:: R^2 = 1 - \frac{\sum_i (\hat y_i - y_i)^2}{\sum_i (y_i - \bar y)^2},

  :math:`\bar y` the split's own mean (scikit-learn's ``r2_score``; unchanged by the
  standardization, which moves :math:`\hat y` and :math:`y` alike); chosen on :math:`R^2`.
  The label-free gradient tail ratio :math:`\tau` is not defined (its pseudo-label is the
  prediction itself, whose squared error has no gradient), so regression runs do not report it.

DREG and every other regularizer act on the network as they do for classification: only the
data loss changes.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from dreg_jax.preprocessing import TASKS  # noqa: F401 (re-exported: the names live with the target's record)

#: The metric that chooses (best epoch, early stopping, tuning's pick), higher is better.
SCORES = {"classification": "accuracy", "regression": "r2"}


#: How reports show a score: its label and the factor it is shown at (accuracy in percent).
SCORE_DISPLAY = {"accuracy": ("accuracy (%)", 100.0), "r2": ("R^2", 1.0)}


def show_score(value: float, score: str, digits: int | None = None) -> str:
    """A score as reports write it: accuracy in percent with 2 decimals, :math:`R^2` with 4."""
    scale = SCORE_DISPLAY[score][1]
    return f"{scale * value:.{digits if digits is not None else (2 if scale == 100 else 4)}f}"


def score_name(task: str) -> str:
    """``"accuracy"`` or ``"r2"``: the metric a run of ``task`` is chosen on (records name it
    ``validation_<score>``, ``test_<score>``)."""
    return SCORES[task]


def per_example_loss(outputs, y, task: str):
    """``(B,)`` data losses: softmax cross-entropy of logits ``(B, C)`` on integer labels, or the
    squared error of the one output ``(B, 1)`` against the (standardized) target."""
    outputs = outputs.astype(jnp.float32)
    if task == "regression":
        return jnp.square(outputs[..., 0] - y)
    return optax.softmax_cross_entropy_with_integer_labels(outputs, y)


def reference_loss(task: str, num_classes):
    """The data loss of a model that learned nothing: :math:`\\log C` (uniform logits), or 1 for
    regression (predicting the training mean of a standardized target). The divergence
    criterion (:mod:`dreg_jax.engine.run`) scales it."""
    if task == "regression":
        return 1.0
    if isinstance(num_classes, int):
        return math.log(num_classes)
    return jnp.log(jnp.asarray(num_classes, jnp.float32))


def batch_metrics(outputs, y, task: str, weights=None) -> dict:
    """Evaluation metrics of one batch: means, or with 0/1 ``weights`` **sums** over the rows of
    weight 1 (a chunk of a split; :func:`finish_metrics` turns the split's mean sums into the
    metrics). Classification: ``loss, accuracy``; regression: ``loss`` (squared error) and the
    target's first two moments ``y_mean, y_sq_mean`` (for :math:`R^2`)."""
    loss = per_example_loss(outputs, y, task)
    parts = {"loss": loss}
    if task == "regression":
        y = y.astype(jnp.float32)
        parts.update(y_mean=y, y_sq_mean=jnp.square(y))
    else:
        parts["accuracy"] = (jnp.argmax(outputs, -1) == y).astype(jnp.float32)
    if weights is None:
        return {k: jnp.mean(v) for k, v in parts.items()}
    return {k: jnp.sum(jnp.where(weights > 0, v, 0.0) * weights) for k, v in parts.items()}


def finish_metrics(means: dict, task: str) -> dict:
    """The split's metrics from :func:`batch_metrics`' means: classification as they are;
    regression ``loss`` and ``r2`` (NaN when the split's target is constant: :math:`R^2` is
    undefined there)."""
    if task != "regression":
        return means
    means = dict(means)
    y_mean, y_sq_mean = means.pop("y_mean"), means.pop("y_sq_mean")
    variance = y_sq_mean - jnp.square(y_mean)
    means["r2"] = jnp.where(variance > 1e-12, 1.0 - means["loss"] / jnp.maximum(variance, 1e-12), jnp.nan)
    return means


__all__ = ["SCORES", "SCORE_DISPLAY", "TASKS", "show_score", "batch_metrics", "finish_metrics", "per_example_loss", "reference_loss",
           "score_name"]
