"""Keep a trained model and use it later: :func:`save_model`, :func:`load_model`, :class:`TrainedModel`.

A model directory holds two files:

* ``model.json``: the format name and version, the dreg_jax version that wrote it, the
  :class:`~dreg_jax.training.config.TrainConfig` (model and regularizer), the class count and
  input width, the data :class:`~dreg_jax.preprocessing.Preprocessing` (feature columns and
  categories, training means and deviations, label names; absent for a built-in dataset, whose
  inputs are already standardized arrays) and what is known of the run (seed, strength,
  learning rate, validation accuracy);
* ``variables.msgpack``: the Flax variables ``{"params", "batch_stats"}`` in Flax's own
  serialization (``flax.serialization.msgpack_serialize``); ``model.json`` records its SHA-256,
  size and tree (every leaf's path, shape and dtype).

A save is whole or not at all (both files are written into a fresh directory beside the
target, fsynced and swapped into place by one ``renameat2`` exchange), holds a lock against a
second saver, and refuses non-finite weights; a load checks every field of ``model.json``, then
the variables' size, checksum, tree and finiteness, and refuses any mismatch in one line naming
the file and the field (see :func:`save_model`, :func:`load_model`).

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

import contextlib
import ctypes
import dataclasses
import datetime
import errno
import glob
import hashlib
import json
import os
import pathlib
import shutil
import stat
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from dreg_jax._files import (
    check_writable_directory,
    create_exclusive,
    current_umask,
    exclusive_lock,
    fault,
    fsync_directory,
    write_all,
)
from dreg_jax.engine.identity import model_identity
from dreg_jax.preprocessing import TASKS, Preprocessing
from dreg_jax.training.config import TrainConfig
from dreg_jax.training.train import build_model

MODEL_FORMAT = "dreg_jax.model"
MODEL_FORMAT_VERSION = 2
#: Versions load_model reads (1: before the checksum; its tree is still checked).
READABLE_VERSIONS = (1, 2)
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
      num_classes: output classes (1 for a regression: its one output).
      num_features: input width.
      preprocessing: raw rows -> inputs and class indices -> labels, or a regression's
        standardized outputs -> the target's units (None: a built-in dataset, whose inputs are
        standardized arrays already).
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

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"`` (``config.task``)."""
        return self.config.task

    def predict_proba(self, x) -> np.ndarray:
        """Class probabilities ``(rows, num_classes)`` of standardized inputs."""
        if self.task == "regression":
            raise ValueError("a regression model predicts values, not class probabilities: use .predict(x)")
        return np.asarray(_softmax(self.logits(x)))

    def predict(self, x) -> np.ndarray:
        """Class indices ``(rows,)`` of standardized inputs (``labels`` maps them to names); a
        regression's values ``(rows,)`` in the target's units (standardized units without a
        preprocessing record)."""
        if self.task == "regression":
            return self._values(self.logits(x)[:, 0])
        return np.argmax(self.logits(x), axis=-1)

    def _values(self, outputs) -> np.ndarray:
        outputs = np.asarray(outputs, np.float64)
        return outputs if self.preprocessing is None else self.preprocessing.target_values(outputs)

    def labels(self, indices) -> list:
        """Class indices -> the original labels (class indices as strings without a record)."""
        if self.preprocessing is None:
            return [str(int(i)) for i in np.asarray(indices).reshape(-1)]
        return self.preprocessing.label(indices)

    def predict_csv(self, path, encoding: str = "utf-8-sig"):
        """``(labels, probabilities, lines)`` for every row of a CSV with the training columns
        (any order; the target and dropped columns may be present and are ignored); a
        regression's ``(values, None, lines)``, the values in the target's units."""
        if self.preprocessing is None:
            raise ValueError("this model was trained on a built-in dataset (standardized arrays, no table "
                             "preprocessing): predict on arrays with .predict(x), or train on your CSV "
                             "(--csv) to predict table rows")
        x, lines = self.preprocessing.transform_csv(path, encoding)
        if self.task == "regression":
            return self.predict(x), None, lines
        probabilities = self.predict_proba(x)
        return self.labels(np.argmax(probabilities, axis=-1)), probabilities, lines

    def predict_csv_chunks(self, path, encoding: str | None = "utf-8-sig", chunk_rows: int = 65536):
        """:meth:`predict_csv` in chunks of at most ``chunk_rows`` rows (memory flat in the file's
        length): yields ``(labels, probabilities, lines)`` per chunk (a regression's
        ``(values, None, lines)``). Each chunk is padded to a
        power of two rows, so a long file compiles a handful of shapes, not one per chunk."""
        if self.preprocessing is None:
            raise ValueError("this model was trained on a built-in dataset (standardized arrays, no table "
                             "preprocessing): predict on arrays with .predict(x), or train on your CSV "
                             "(--csv) to predict table rows")
        for x, lines in self.preprocessing.transform_csv_chunks(path, encoding or "utf-8-sig", chunk_rows):
            rows = len(x)
            padded = np.zeros((1 << max(rows - 1, 0).bit_length(), x.shape[1]), np.float32)
            padded[:rows] = x
            if self.task == "regression":
                yield self.predict(padded)[:rows], None, lines
                continue
            probabilities = self.predict_proba(padded)[:rows]
            yield self.labels(np.argmax(probabilities, axis=-1)), probabilities, lines

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


#: Bounds on what a ``model.json`` may ask for (checked before anything is built).
MAX_WIDTH = 65536
MAX_CLASSES = 100_000
MAX_FEATURES = 10_000_000
#: Largest ``model.json`` read (a preprocessing record with many categories stays far below it).
MAX_RECORD_BYTES = 64 * 2**20


def _leaf_table(tree) -> dict:
    """``{"params/Dense_0/kernel": {"shape": [...], "dtype": "float32"}, ...}`` of a variables tree."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): {
        "shape": [int(d) for d in np.shape(leaf)],
        "dtype": str(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype)}
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _nonfinite_leaf(tree) -> str | None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.inexact) and not np.isfinite(leaf).all():
            return f"{jax.tree_util.keystr(path)} ({int((~np.isfinite(leaf)).sum())} of {leaf.size} values)"
    return None


def _lock_path(directory: pathlib.Path) -> pathlib.Path:
    return directory.parent / f".{directory.name}.lock"


_HELD_LOCKS: dict = {}  # lock path -> depth: a process holding a directory's lock may save into it


@contextlib.contextmanager
def model_directory_lock(directory):
    """Holds the lock of a model directory (``.<name>.lock`` beside it, removed afterwards) for the block.

    A second process saving into the same directory is refused at once, in one line (the CLI takes
    the lock before training, so the second command stops before it trains). Re-entrant within
    a process: ``save_model`` inside the block does not take it again.
    """
    directory = pathlib.Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    key = str(_lock_path(directory.absolute()).resolve())
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key] += 1
        try:
            yield directory
        finally:
            _HELD_LOCKS[key] -= 1
        return
    with exclusive_lock(_lock_path(directory), holder=f"another process is saving a model to {directory}",
                        remove=True):
        _HELD_LOCKS[key] = 1
        try:
            yield directory
        finally:
            del _HELD_LOCKS[key]


def check_model_directory(directory) -> pathlib.Path:
    """Refuses a path that is a file, a symbolic link, a directory holding anything but a saved
    model (which a new save replaces), a model file that is a link, or a place that cannot be
    written: nothing else is ever overwritten, and nothing is written through a link."""
    directory = pathlib.Path(directory)
    check_writable_directory(directory, "model directory")
    if directory.is_dir():
        other = sorted(p.name for p in directory.iterdir() if p.name not in (CONFIG_FILE, VARIABLES_FILE))
        if other:
            raise ValueError(f"{directory} holds other files ({', '.join(other[:5])}); pick an empty or new "
                             "directory for the model")
        links = sorted(p.name for p in directory.iterdir() if p.is_symlink() or not p.is_file())
        if links:
            raise ValueError(f"{directory / links[0]} is a link or not a regular file: not a model dreg_jax "
                             "wrote; remove it or pick another directory")
    return directory


def _renameat2_exchange():
    """``renameat2(..., RENAME_EXCHANGE)`` of the C library, or None where it is missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _swap_into_place(new: pathlib.Path, directory: pathlib.Path) -> pathlib.Path | None:
    """Puts the complete directory ``new`` at ``directory`` in one step; returns where the old
    model went (to be removed), or None when there was none."""
    if not directory.exists():
        os.rename(new, directory)  # replaces nothing but an empty directory made meanwhile
        return None
    exchange = _renameat2_exchange()
    if exchange is not None:
        at_cwd, rename_exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
        if exchange(at_cwd, os.fsencode(new), at_cwd, os.fsencode(directory), rename_exchange) == 0:
            return new  # the old model now sits at the temporary name
    # no atomic exchange on this system or filesystem: two renames; a kill between them leaves the
    # old model at .<name>.old-* (load_model names it) and the new one complete at .<name>.saving-*
    old = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
    os.rename(directory, old / "model")
    fault("save:between-renames")
    os.rename(new, directory)
    return old


def _remove_leftovers(directory: pathlib.Path):
    """Removes what killed saves into ``directory`` left beside it (called under its lock)."""
    for prefix in (f".{directory.name}.saving-", f".{directory.name}.old-"):
        for path in directory.parent.glob(glob.escape(prefix) + "*"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)


def save_model(directory, variables, config: TrainConfig, num_classes: int, num_features: int, *,
               preprocessing: Preprocessing | None = None, run: dict | None = None) -> pathlib.Path:
    """Writes a model directory (module docs): ``model.json`` and ``variables.msgpack``, whole or
    not at all.

    The two files are written into a fresh directory beside the target, fsynced, and then swapped
    into place in one rename (``renameat2`` exchange): a kill, a full disk or an error at any
    point leaves the old model whole or the new one complete, never a mix. ``model.json``
    records the SHA-256, size and tree (paths, shapes, dtypes) of the variables, which
    :func:`load_model` checks. A lock (``.<name>.lock`` beside the directory) refuses a second
    saver. Variables holding NaN or inf (a diverged run) are refused.

    Args:
      directory: created if needed; an existing model there is replaced, any other file refused.
      variables: ``{"params": ..., "batch_stats": ...}``, or a ``TrainState`` (its params and
        batch stats are taken).
      config: the run's own config (not a folded program's).
      num_classes: output classes.
      num_features: input width.
      preprocessing: ``Dataset.preprocessing`` of the training data (user data), or None.
      run: JSON-able facts about the run (seed, strength, learning rate, validation accuracy).

    Returns:
      The directory.
    """
    directory = pathlib.Path(directory)
    if hasattr(variables, "params"):  # a TrainState
        variables = {"params": variables.params, "batch_stats": variables.batch_stats}
    variables = _plain({"params": variables["params"], "batch_stats": variables.get("batch_stats", {}) or {}})
    bad = _nonfinite_leaf(variables)
    if bad is not None:
        raise ValueError(f"the model's variables hold NaN or inf at {bad}: the run diverged; nothing was "
                         f"saved to {directory} (lower the learning rate or the strength)")
    if preprocessing is not None and preprocessing.task != config.task:
        raise ValueError(f"the preprocessing record is a {preprocessing.task}'s and the config's task is {config.task!r}")
    if preprocessing is not None and config.task == "classification" and len(preprocessing.label_names) != int(num_classes):
        raise ValueError(f"preprocessing names {len(preprocessing.label_names)} labels for {num_classes} classes")
    if config.task == "regression" and int(num_classes) != 1:
        raise ValueError(f"a regression model has one output: num_classes must be 1, got {num_classes}")
    payload = serialization.msgpack_serialize(variables)
    record = {
        "format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "dreg_jax_version": _version(),
        "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": _config_dict(config), "num_classes": int(num_classes), "num_features": int(num_features),
        "preprocessing": None if preprocessing is None else preprocessing.to_dict(),
        "run": json.loads(json.dumps(run or {}, default=float)),
        "variables": {"file": VARIABLES_FILE, "bytes": len(payload),
                      "sha256": hashlib.sha256(payload).hexdigest(), "leaves": _leaf_table(variables)},
    }
    text = (json.dumps(record, indent=2, allow_nan=False) + "\n").encode()
    check_model_directory(directory)  # refused before anything, the lock file included, is written
    with model_directory_lock(directory):
        check_model_directory(directory)
        _remove_leftovers(directory)
        fault("save:start")
        new = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.saving-"))
        try:
            for name, data in ((VARIABLES_FILE, payload), (CONFIG_FILE, text)):
                fd = create_exclusive(new / name)
                try:
                    write_all(fd, data, fault_point=f"save:{name}:half")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fault(f"save:{name}:written")
            os.chmod(new, 0o755 & ~current_umask())
            fsync_directory(new)
            fault("save:before-rename")
            old = _swap_into_place(new, directory)
            fsync_directory(directory.parent)
            fault("save:after-rename")
        except BaseException:
            if new.exists() and new.resolve() != directory.resolve():
                shutil.rmtree(new, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return directory


def _read_regular(path: pathlib.Path, limit: int, directory: pathlib.Path) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (no links, devices or pipes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ValueError(f"{directory} is not a whole saved model: {path.name} is missing") from None
    except OSError as err:
        reason = "is a symbolic link" if err.errno == errno.ELOOP else f"cannot be read ({err.strerror})"
        raise ValueError(f"{path} {reason}: not a model file dreg_jax wrote") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file: not a model file dreg_jax wrote")
        if info.st_size > limit:
            raise ValueError(f"{path} holds {info.st_size} bytes, more than the {limit} this model needs")
        chunks, left = [], limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 2**24))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _field(record: dict, name: str, kinds, where: str, *, minimum=None, maximum=None):
    if name not in record:
        raise ValueError(f"{where} lacks the field {name!r}; the model directory is damaged (save it again)")
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, kinds):  # JSON true is not a count
        raise ValueError(f"{where}: field {name!r} is {str(value)[:80]!r}, expected {kinds.__name__}")
    if minimum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{where}: field {name!r} is {value}, expected {minimum}..{maximum}")
    return value


def _read_record(directory: pathlib.Path) -> dict:
    """``model.json`` parsed, with every field checked (types, ranges, counts) before use."""
    path = directory / CONFIG_FILE
    try:
        record = json.loads(_read_regular(path, MAX_RECORD_BYTES, directory).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the model directory is damaged") from None
    except RecursionError:
        raise ValueError(f"{path} nests too deeply to be a model record") from None
    where = str(path)
    if not isinstance(record, dict):
        raise ValueError(f"{where} holds a JSON {type(record).__name__}, not a model record (an object)")
    if record.get("format") != MODEL_FORMAT:
        raise ValueError(f"{where} is not a dreg_jax model (format {record.get('format')!r})")
    version = record.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{where} has model format version {version!r}; this dreg_jax ({_version()}) reads "
                         f"version(s) {', '.join(map(str, READABLE_VERSIONS))}")
    config = _field(record, "config", dict, where)
    task = config.get("task", "classification")
    if task not in TASKS:
        raise ValueError(f"{where}: config.task is {task!r}, expected one of {', '.join(map(repr, TASKS))}")
    regression = task == "regression"
    num_classes = _field(record, "num_classes", int, where, minimum=1 if regression else 2,
                         maximum=1 if regression else MAX_CLASSES)
    num_features = _field(record, "num_features", int, where, minimum=1, maximum=MAX_FEATURES)
    for part in ("model", "regularizer", "optimizer"):
        _field(config, part, dict, f"{where} config")
    hidden = config["model"].get("hidden")
    if not isinstance(hidden, list) or not hidden or not all(
            isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= MAX_WIDTH for w in hidden):
        raise ValueError(f"{where}: config.model.hidden is {hidden!r}, expected a list of widths in 1..{MAX_WIDTH}")
    preprocessing = record.get("preprocessing")
    if preprocessing is not None:
        _field(record, "preprocessing", dict, where)
        names = preprocessing.get("label_names")
        if (preprocessing.get("task", "classification") != task or preprocessing.get("version") == 1 and regression):
            raise ValueError(f"{where}: preprocessing.task is {preprocessing.get('task', 'classification')!r} and "
                             f"config.task {task!r}; the model directory is damaged")
        if regression:
            for field in ("target_mean", "target_std"):
                v = preprocessing.get(field)
                if not (isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)):
                    raise ValueError(f"{where}: preprocessing.{field} is {v!r}, expected a finite number")
            if not preprocessing["target_std"] > 0:
                raise ValueError(f"{where}: preprocessing.target_std must be positive")
        if not isinstance(names, list) or len(names) != (0 if regression else num_classes):
            raise ValueError(f"{where}: preprocessing.label_names has {len(names) if isinstance(names, list) else names!r} "
                             f"names for num_classes {num_classes}")
        for field in ("scale", "mean", "std"):
            values = preprocessing.get(field)
            if not isinstance(values, list) or len(values) != num_features or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values):
                raise ValueError(f"{where}: preprocessing.{field} must be {num_features} finite numbers (num_features)")
        if not all(isinstance(v, (int, float)) and v > 0 for v in preprocessing["std"] + preprocessing["scale"]):
            raise ValueError(f"{where}: preprocessing.std and .scale must be positive")
    if version >= 2:
        for name in ("preprocessing", "run", "dreg_jax_version", "saved"):
            if name not in record:
                raise ValueError(f"{where} lacks the field {name!r}; the model directory is damaged (save it again)")
    if not isinstance(record.get("run", {}), dict):
        raise ValueError(f"{where}: field 'run' is {record['run']!r}, expected an object")
    if version >= 2:
        meta = _field(record, "variables", dict, where)
        _field(meta, "bytes", int, f"{where} variables", minimum=1, maximum=2**40)
        digest = _field(meta, "sha256", str, f"{where} variables")
        if len(digest) != 64:
            raise ValueError(f"{where}: variables.sha256 is not a SHA-256 hex digest")
        _field(meta, "leaves", dict, f"{where} variables")
    return record


def load_model(directory, module=None) -> TrainedModel:
    """The :class:`TrainedModel` saved in ``directory`` (:func:`save_model`).

    Every field of ``model.json`` is checked before anything is built (types, ranges, label
    count = class count, widths at most :data:`MAX_WIDTH`); ``variables.msgpack`` must be a
    regular file of the recorded size and SHA-256 whose tree (paths, shapes, dtypes) is the one
    recorded and the one the config's model has, with finite values. Any mismatch is refused in
    one line naming the file and the field.

    Args:
      directory: a model directory.
      module: your own linen module or ``NNXModel``, when the model is one (its code must be
        the saved one: the identity fingerprints are compared).

    Returns:
      A :class:`TrainedModel`.
    """
    directory = pathlib.Path(directory)
    if not directory.exists() and not directory.is_symlink():
        # a save killed between its two renames (systems without an atomic exchange) left the
        # previous model whole beside the directory: read it there, and say so
        left = [p / "model" for p in sorted(directory.parent.glob(glob.escape(f".{directory.name}.old-") + "*"))
                if (p / "model" / CONFIG_FILE).is_file()]
        if left:
            warnings.warn(f"a save into {directory} was interrupted; reading the previous model from {left[-1]} "
                          "(the next save into the directory completes the replacement)", UserWarning, stacklevel=2)
            return load_model(left[-1], module)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a saved model (not a directory); save one with "
                         "`dreg-jax train --save-model DIR` or dreg_jax.save_model")
    if not (directory / CONFIG_FILE).exists() and not (directory / CONFIG_FILE).is_symlink():
        raise ValueError(f"{directory} is not a saved model (no {CONFIG_FILE}); save one with "
                         "`dreg-jax train --save-model DIR` or dreg_jax.save_model")
    record = _read_record(directory)
    where = directory / CONFIG_FILE
    try:
        config = TrainConfig.from_dict(record["config"])
        config.validate() if config.model.module is None else None
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: config cannot be read ({type(err).__name__}: {err})") from None
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
    num_classes, num_features = record["num_classes"], record["num_features"]
    try:
        preprocessing = (None if record.get("preprocessing") is None
                         else Preprocessing.from_dict(record["preprocessing"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: preprocessing cannot be read ({type(err).__name__}: {err})") from None
    if preprocessing is not None and preprocessing.num_features != num_features:
        raise ValueError(f"{where}: preprocessing encodes {preprocessing.num_features} features, num_features "
                         f"is {num_features}")
    # the model's tree from shapes alone (nothing allocated): a config asking for a huge model is
    # refused by the comparison below, never built
    shapes = jax.eval_shape(lambda: build_model(config, num_classes).init(
        jax.random.key(0), jnp.zeros((1, num_features), jnp.float32)))
    template = _leaf_table({"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})})
    variables_path = directory / VARIABLES_FILE
    meta = record.get("variables")
    if meta is not None:
        recorded = meta["leaves"]
        if recorded != template:
            raise ValueError(f"{where}: variables.leaves ({_describe_difference(recorded, template)}) do not "
                             "fit the model its config builds; the model directory is damaged")
        payload = _read_regular(variables_path, meta["bytes"], directory)
        if len(payload) != meta["bytes"]:
            raise ValueError(f"{variables_path} holds {len(payload)} bytes, {CONFIG_FILE} records {meta['bytes']}: "
                             "the file is cut short or was replaced")
        if hashlib.sha256(payload).hexdigest() != meta["sha256"]:
            raise ValueError(f"{variables_path} does not match the SHA-256 recorded in {CONFIG_FILE}: the "
                             "weights were changed or belong to another model")
    else:  # format 1 (no checksum): the tree is still checked against the config
        expected = sum(int(np.prod(v["shape"])) * np.dtype(v["dtype"]).itemsize for v in template.values())
        payload = _read_regular(variables_path, 2 * expected + 2**20, directory)
    try:
        restored = serialization.msgpack_restore(payload)
    except Exception as err:  # noqa: BLE001 - msgpack's own error types: one line naming the file
        raise ValueError(f"{variables_path} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(restored, dict):
        raise ValueError(f"{variables_path} does not hold a variables tree")
    restored = {"params": restored.get("params", {}), "batch_stats": restored.get("batch_stats", {}) or {}}
    got = _leaf_table(restored)
    if got != template:
        raise ValueError(f"{variables_path} does not fit the saved config's model: {_describe_difference(got, template)}")
    bad = _nonfinite_leaf(restored)
    if bad is not None:
        raise ValueError(f"{variables_path} holds NaN or inf at {bad}: not a usable model")
    return TrainedModel(config, _plain(restored), num_classes, num_features, preprocessing, record.get("run", {}))


def _describe_difference(got: dict, want: dict) -> str:
    extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    if extra:
        return f"it has {extra[0]} that the model lacks ({len(extra)} such leaves)"
    if missing:
        return f"it lacks {missing[0]} ({len(missing)} such leaves)"
    for name in sorted(want):
        if got[name] != want[name]:
            return f"{name} is {got[name]['shape']} {got[name]['dtype']}, the model needs {want[name]['shape']} {want[name]['dtype']}"
    return "they differ"


__all__ = ["TrainedModel", "check_model_directory", "load_model", "model_directory_lock", "save_model"]
