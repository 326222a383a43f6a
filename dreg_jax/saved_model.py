"""Keep a trained model and use it later: :func:`save_model`, :func:`load_model`, :class:`TrainedModel`.

A model directory holds two files:

* ``model.json``: the format name and version, the dreg_jax version that wrote it, the
  :class:`~dreg_jax.training.config.TrainConfig` (model and regularizer), the class count and
  input width, the data :class:`~dreg_jax.preprocessing.Preprocessing` (feature columns and
  categories, training means and deviations, label names; absent for a built-in dataset, whose
  inputs are already standardized arrays) and what is known of the run (seed, strength,
  learning rate, validation accuracy);
* ``variables.msgpack``: the Flax variables ``{"params", "batch_stats"}`` in Flax's own
  serialization (``flax.serialization.msgpack_serialize``).

Why msgpack and not an Orbax checkpoint: these models are small single-host pytrees, Flax reads
the file with ``flax.serialization.msgpack_restore`` (no extra dependency, one file, the same
bytes on every platform), and Orbax's strengths (sharded, asynchronous, multi-host checkpoints
of large training states) do not apply. To hand the parameters to Orbax:
``orbax.checkpoint.StandardCheckpointer().save(path, load_model(d).variables)``.

A model of your own module records the module's identity (``"<Class>@<fingerprint>"`` of its
code, :mod:`dreg_jax.engine.identity`); code cannot be stored in JSON, so
``load_model(directory, module=...)`` takes the module and refuses one whose code differs.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from dreg_jax.engine.identity import model_identity
from dreg_jax.preprocessing import Preprocessing
from dreg_jax.training.config import TrainConfig
from dreg_jax.training.train import build_model

MODEL_FORMAT = "dreg_jax.model"
MODEL_FORMAT_VERSION = 1
CONFIG_FILE = "model.json"
VARIABLES_FILE = "variables.msgpack"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dreg_jax")
    except PackageNotFoundError:  # a source checkout that was not installed
        return "unknown"


@jax.jit
def _softmax(logits):
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedModel:
    """A trained network that predicts.

    Attributes:
      config: the run's config (model and regularizer).
      variables: ``{"params": ..., "batch_stats": ...}`` (numpy arrays).
      num_classes, num_features: output classes and input width.
      preprocessing: raw rows -> inputs and class indices -> labels (None: a built-in dataset,
        whose inputs are standardized arrays already).
      run: what is known of the run (seed, strength, learning rate, validation accuracy).
    """

    config: TrainConfig
    variables: dict
    num_classes: int
    num_features: int
    preprocessing: Preprocessing | None = None
    run: dict = dataclasses.field(default_factory=dict)

    def logits(self, x) -> np.ndarray:
        """Logits ``(rows, num_classes)`` of standardized inputs ``x`` ``(rows, num_features)``
        (inference mode: no dropout, batch-norm running statistics)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"x must be (rows, {self.num_features}), got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
            raise ValueError("x must hold finite floating values (standardized features; raw table rows go "
                             "through predict_csv)")
        return np.asarray(_apply(self.config, self.num_classes)(self.variables, jnp.asarray(x, jnp.float32)))

    def predict_proba(self, x) -> np.ndarray:
        """Class probabilities ``(rows, num_classes)`` of standardized inputs."""
        return np.asarray(_softmax(self.logits(x)))

    def predict(self, x) -> np.ndarray:
        """Class indices ``(rows,)`` of standardized inputs (``labels`` maps them to names)."""
        return np.argmax(self.logits(x), axis=-1)

    def labels(self, indices) -> list:
        """Class indices -> the original labels (class indices as strings without a record)."""
        if self.preprocessing is None:
            return [str(int(i)) for i in np.asarray(indices).reshape(-1)]
        return self.preprocessing.label(indices)

    def predict_csv(self, path, encoding: str = "utf-8-sig"):
        """``(labels, probabilities, lines)`` for every row of a CSV with the training columns
        (any order; the target and dropped columns may be present and are ignored)."""
        if self.preprocessing is None:
            raise ValueError("this model was trained on a built-in dataset (standardized arrays, no table "
                             "preprocessing): predict on arrays with .predict(x), or train on your CSV "
                             "(--csv) to predict table rows")
        x, lines = self.preprocessing.transform_csv(path, encoding)
        probabilities = self.predict_proba(x)
        return self.labels(np.argmax(probabilities, axis=-1)), probabilities, lines

    def save(self, directory) -> pathlib.Path:
        """:func:`save_model` of this model."""
        return save_model(directory, self.variables, self.config, self.num_classes, self.num_features,
                          preprocessing=self.preprocessing, run=self.run)


_APPLY_CACHE: dict = {}


def _apply(config: TrainConfig, num_classes: int):
    key = (config, num_classes)
    if key not in _APPLY_CACHE:
        model = build_model(config, num_classes)
        _APPLY_CACHE[key] = jax.jit(lambda variables, x: model.apply(
            {k: v for k, v in variables.items() if v}, x))
    return _APPLY_CACHE[key]


def _config_dict(config: TrainConfig) -> dict:
    if config.fold is not None:
        raise ValueError("a folded program config holds several runs' choices; save one run's own config")
    module = config.model.module
    if module is not None and not isinstance(module, str):
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, module=model_identity(module)))
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _plain(tree):
    """numpy leaves, empty collections kept as ``{}``."""
    return jax.tree_util.tree_map(np.asarray, dict(tree))


def check_model_directory(directory) -> pathlib.Path:
    """Refuses a path that is a file or a directory holding anything but a saved model (which
    a new save replaces): nothing else is ever overwritten."""
    directory = pathlib.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file; a model is saved to a directory")
    if directory.is_dir():
        other = sorted(p.name for p in directory.iterdir() if p.name not in (CONFIG_FILE, VARIABLES_FILE))
        if other:
            raise ValueError(f"{directory} holds other files ({', '.join(other[:5])}); pick an empty or new "
                             "directory for the model")
    return directory


def save_model(directory, variables, config: TrainConfig, num_classes: int, num_features: int, *,
               preprocessing: Preprocessing | None = None, run: dict | None = None) -> pathlib.Path:
    """Writes a model directory (module docs): ``model.json`` and ``variables.msgpack``.

    Args:
      directory: created if needed; an existing model there is replaced, any other file refused.
      variables: ``{"params": ..., "batch_stats": ...}``, or a ``TrainState`` (its params and
        batch stats are taken).
      config: the run's own config (not a folded program's).
      num_classes, num_features: output classes and input width.
      preprocessing: ``Dataset.preprocessing`` of the training data (user data), or None.
      run: JSON-able facts about the run (seed, strength, learning rate, validation accuracy).

    Returns:
      The directory.
    """
    directory = pathlib.Path(directory)
    if hasattr(variables, "params"):  # a TrainState
        variables = {"params": variables.params, "batch_stats": variables.batch_stats}
    variables = _plain({"params": variables["params"], "batch_stats": variables.get("batch_stats", {}) or {}})
    check_model_directory(directory)
    record = {
        "format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "dreg_jax_version": _version(),
        "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": _config_dict(config), "num_classes": int(num_classes), "num_features": int(num_features),
        "preprocessing": None if preprocessing is None else preprocessing.to_dict(),
        "run": json.loads(json.dumps(run or {}, default=float)),
    }
    directory.mkdir(parents=True, exist_ok=True)
    # variables first, the JSON last: a directory with model.json holds a whole model
    (directory / VARIABLES_FILE).write_bytes(serialization.msgpack_serialize(variables))
    (directory / CONFIG_FILE).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    return directory


def load_model(directory, module=None) -> TrainedModel:
    """The :class:`TrainedModel` saved in ``directory`` (:func:`save_model`).

    Args:
      directory: a model directory.
      module: your own linen module or ``NNXModel``, when the model is one (its code must be
        the saved one: the identity fingerprints are compared).

    Returns:
      A :class:`TrainedModel`; its variables are checked against the model's structure.
    """
    directory = pathlib.Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{directory} is not a saved model (no {CONFIG_FILE}); save one with "
                         "`dreg-jax train --save-model DIR` or dreg_jax.save_model")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the model directory is damaged") from None
    if record.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a dreg_jax model (format {record.get('format')!r})")
    if record.get("format_version") != MODEL_FORMAT_VERSION:
        raise ValueError(f"{path} has model format version {record.get('format_version')!r}; this dreg_jax "
                         f"({_version()}) reads version {MODEL_FORMAT_VERSION}")
    config = TrainConfig.from_dict(record["config"])
    saved_module = config.model.module
    if saved_module is not None:
        if module is None:
            raise ValueError(f"{directory} holds a model of your own module {saved_module}; pass it: "
                             "load_model(directory, module=YourModule(...))")
        if model_identity(module) != saved_module:
            raise ValueError(f"the module passed ({model_identity(module)}) is not the saved one ({saved_module}): "
                             "its code or attributes differ, so the saved parameters may not mean the same")
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, module=module))
    elif module is not None:
        raise ValueError(f"{directory} holds a built-in MLP; leave module unset")
    num_classes, num_features = int(record["num_classes"]), int(record["num_features"])
    template = build_model(config, num_classes).init(jax.random.key(0), jnp.zeros((1, num_features), jnp.float32))
    template = {"params": template["params"], "batch_stats": template.get("batch_stats", {})}
    restored = serialization.msgpack_restore((directory / VARIABLES_FILE).read_bytes())
    try:
        variables = serialization.from_state_dict(_plain(template), restored)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{directory / VARIABLES_FILE} does not fit the saved config's model: {err}") from None
    for (path_, want), got in zip(jax.tree_util.tree_leaves_with_path(template), jax.tree_util.tree_leaves(variables)):
        if np.shape(want) != np.shape(got):
            raise ValueError(f"{directory / VARIABLES_FILE}: {jax.tree_util.keystr(path_)} has shape "
                             f"{np.shape(got)}, the model needs {np.shape(want)}")
    preprocessing = record.get("preprocessing")
    return TrainedModel(config, _plain(variables), num_classes, num_features,
                        None if preprocessing is None else Preprocessing.from_dict(preprocessing),
                        record.get("run", {}))


__all__ = ["TrainedModel", "check_model_directory", "load_model", "save_model"]
