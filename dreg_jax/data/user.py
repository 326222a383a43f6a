"""Your own data as the same :class:`Dataset` the built-in sets are: ``from_arrays``, ``from_csv``.

Both check the data before anything trains and say what to do:

* shapes (2-D features, 1-D labels of the same length, the same columns in every split);
* NaN/inf: the error names the split, the column (and its name) and the row (the CSV line);
* labels: strings are encoded in sorted order and the mapping kept (``Dataset.label_names``);
  integer labels must be >= 0; a class in the test split that training never saw is refused;
* constant training columns are kept (standardized to 0) and reported with a warning;
* string (categorical) feature columns of a CSV are one-hot encoded with the categories seen in
  training (recorded in ``Dataset.feature_names`` as ``column=value``); an unseen category in
  the test file is refused;
* features are standardized with the training split's statistics only;
* without a test split, a stratified one is drawn (``test_fraction``), and a stratified
  validation split is carved from training (``validation_fraction``), both from ``seed``.

``register_dataset`` makes such a dataset reachable by name (``load_dataset``, ``RunSpec``,
sweeps) in this process; the CLI does it for ``--csv FILE --target COL``.
"""
from __future__ import annotations

import csv
import pathlib
import warnings

import numpy as np

from dreg_jax.data.registry import (
    REGISTRY,
    USER_DATASETS,
    Dataset,
    DatasetInfo,
    _vector_robust_sets,
    standardize,
    stratified_holdout,
)


def _encode_labels(y_train, y_test):
    y_train, y_test = np.asarray(y_train), None if y_test is None else np.asarray(y_test)
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        if y is not None and y.ndim != 1:
            raise ValueError(f"{name} must be 1-D (one label per row), got shape {y.shape}")
    if y_train.dtype.kind in "USO":  # strings: encode, keep the mapping
        names = sorted({str(v) for v in y_train})
        index = {n: i for i, n in enumerate(names)}
        unseen = sorted({str(v) for v in y_test} - set(names)) if y_test is not None else []
        if unseen:
            raise ValueError(f"y_test has label(s) {unseen[:5]} that y_train never has; known: {names}")
        encode = lambda y: np.array([index[str(v)] for v in y], np.int32)  # noqa: E731
        return encode(y_train), None if y_test is None else encode(y_test), tuple(names)
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        if y is None:
            continue
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            raise ValueError(f"{name} has NaN/inf labels at row(s) {np.flatnonzero(~np.isfinite(y))[:5].tolist()}")
        if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.all(y == np.round(y))):
            raise TypeError(f"{name} must hold integer class labels or strings, got dtype {y.dtype}")
        if y.size and y.min() < 0:
            raise ValueError(f"{name} labels must be >= 0, got {int(y.min())} at row {int(np.argmin(y))}")
    num_classes = int(y_train.max()) + 1
    if y_test is not None and y_test.size and y_test.max() >= num_classes:
        raise ValueError(f"y_test has label {int(y_test.max())} but y_train's labels lie in [0, {num_classes}); "
                         "the training split must contain every class")
    names = tuple(str(i) for i in range(num_classes))
    return y_train.astype(np.int32), None if y_test is None else y_test.astype(np.int32), names


def _check_features(x, split, feature_names):
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x_{split} must be 2-D (rows, features), got shape {x.shape}")
    if x.dtype.kind not in "fiub":
        raise TypeError(f"x_{split} must be numeric, got dtype {x.dtype}; encode categorical columns "
                        "first (from_csv does it)")
    x = x.astype(np.float64)
    bad = np.argwhere(~np.isfinite(x))
    if bad.size:
        r, c = bad[0]
        raise ValueError(f"x_{split} column {c} ({feature_names[c]!r}) row {r} is {x[r, c]}; "
                         f"{len(bad)} cell(s) are NaN/inf in all: impute or drop them")
    return x


def from_arrays(x_train, y_train, x_test=None, y_test=None, *, validation_fraction: float = 0.1,
                test_fraction: float = 0.2, seed: int = 0, name: str = "arrays",
                feature_names=None, label_names=None) -> Dataset:
    """A :class:`Dataset` from arrays, checked, split and standardized (see the module docs).

    Args:
      x_train, y_train: training features ``(n, d)`` and labels ``(n,)`` (ints >= 0 or strings).
      x_test, y_test: a test split; None draws a stratified ``test_fraction`` of the training rows.
      validation_fraction: stratified share of the training rows held out for validation, in [0, 1).
      seed: seed of the test and validation splits.
      name: the dataset's name (what ``register_dataset`` registers).
      feature_names: column names for messages and records (default ``x0, x1, ...``).
      label_names: names of the integer classes (strings are named by themselves).

    Returns:
      A ``Dataset`` with ``x_val``/``y_val``, ``label_names`` and ``feature_names`` set.
    """
    if (x_test is None) != (y_test is None):
        raise ValueError("pass both x_test and y_test, or neither (a stratified test split is drawn)")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if x_test is None and not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x_train = np.asarray(x_train)
    d = x_train.shape[1] if x_train.ndim == 2 else 0
    feature_names = tuple(feature_names) if feature_names is not None else tuple(f"x{i}" for i in range(d))
    x_train = _check_features(x_train, "train", feature_names)
    if len(feature_names) != x_train.shape[1]:
        raise ValueError(f"feature_names has {len(feature_names)} names for {x_train.shape[1]} columns")
    if len(np.asarray(y_train)) != len(x_train):
        raise ValueError(f"x_train has {len(x_train)} rows but y_train has {len(np.asarray(y_train))}")
    if x_test is not None:
        x_test = _check_features(x_test, "test", feature_names)
        if x_test.shape[1] != x_train.shape[1]:
            raise ValueError(f"x_train has {x_train.shape[1]} features but x_test has {x_test.shape[1]}")
        if len(np.asarray(y_test)) != len(x_test):
            raise ValueError(f"x_test has {len(x_test)} rows but y_test has {len(np.asarray(y_test))}")
    y_train, y_test, names = _encode_labels(y_train, y_test)
    if label_names is not None:
        names = tuple(label_names)
    num_classes = len(names)
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    rng = np.random.default_rng(seed)
    if x_test is None:
        test = stratified_holdout(y_train, test_fraction, rng)
        x_train, x_test, y_train, y_test = x_train[~test], x_train[test], y_train[~test], y_train[test]
    val = stratified_holdout(y_train, validation_fraction, rng)
    x_val, y_val = x_train[val], y_train[val]
    x_train, y_train = x_train[~val], y_train[~val]
    constant = [feature_names[c] for c in np.flatnonzero(x_train.std(axis=0) == 0)]
    if constant:
        warnings.warn(f"{name}: constant training column(s) {constant[:10]} carry no information "
                      "(kept; standardized to 0)", UserWarning, stacklevel=2)
    x_train, x_test, x_val = standardize(x_train, x_test, x_val)
    info = DatasetInfo(name, "tabular", num_classes, "user", x_train.shape[1])
    return Dataset(name, x_train, y_train, x_test, y_test.astype(np.int32), num_classes, "tabular",
                   _vector_robust_sets(x_test), info, None, x_val=x_val, y_val=y_val.astype(np.int32),
                   label_names=names, feature_names=feature_names)


def _read_csv(path: pathlib.Path):
    if not path.exists():
        raise ValueError(f"CSV file {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"CSV file {path} is empty") from None
        rows, lines = [], []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{reader.line_num}: {len(row)} cells, the header has {len(header)}")
            rows.append(row)
            lines.append(reader.line_num)
    if not rows:
        raise ValueError(f"CSV file {path} has a header but no rows")
    return [h.strip() for h in header], rows, lines


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _columns(header, rows, target, path):
    if target not in header:
        raise ValueError(f"target column {target!r} is not in {path}; its columns: {', '.join(header)}")
    t = header.index(target)
    labels = [row[t].strip() for row in rows]
    missing = [i for i, v in enumerate(labels) if v == ""]
    if missing:
        raise ValueError(f"{path}: target column {target!r} is empty in {len(missing)} row(s)")
    features = [(name, [row[i].strip() for row in rows]) for i, name in enumerate(header) if i != t]
    return labels, features


MISSING = {"", "na", "nan", "null", "none", "?"}


def from_csv(path, target: str, *, test_csv=None, validation_fraction: float = 0.1,
             test_fraction: float = 0.2, seed: int = 0, name: str | None = None) -> Dataset:
    """A :class:`Dataset` from a CSV with a header row; ``target`` names the label column.

    Numeric columns are used as they are; a column with any non-numeric cell is categorical and
    one-hot encoded. Empty / ``NA`` / ``NaN`` / ``?`` cells are refused, naming column and line.
    """
    path = pathlib.Path(path)
    header, rows, lines = _read_csv(path)
    labels, features = _columns(header, rows, target, path)
    test = None
    if test_csv is not None:
        test_header, test_rows, test_lines = _read_csv(pathlib.Path(test_csv))
        if sorted(test_header) != sorted(header):
            raise ValueError(f"{test_csv} has columns {test_header}, {path} has {header}")
        test = (_columns(test_header, test_rows, target, test_csv), test_lines)
    columns, names, test_columns = [], [], []
    for name_, values in features:
        for i, v in enumerate(values):
            if v.lower() in MISSING:
                raise ValueError(f"{path}: column {name_!r} line {lines[i]} is missing ({v!r}); "
                                 "impute or drop it before training")
        test_values = dict(test[0][1])[name_] if test else None
        if all(_is_number(v) for v in values):
            columns.append(np.array([float(v) for v in values]))
            names.append(name_)
            if test:
                bad = [(i, v) for i, v in enumerate(test_values) if v.lower() in MISSING or not _is_number(v)]
                if bad:
                    raise ValueError(f"{test_csv}: column {name_!r} line {test[1][bad[0][0]]} is {bad[0][1]!r}, "
                                     "not a number")
                test_columns.append(np.array([float(v) for v in test_values]))
            continue
        categories = sorted(set(values))  # categorical: one-hot with the training categories
        if test:
            unseen = sorted(set(test_values) - set(categories))
            if unseen:
                raise ValueError(f"{test_csv}: column {name_!r} has categories {unseen[:5]} that "
                                 f"{path} never has; known: {categories[:20]}")
        for category in categories:
            columns.append(np.array([v == category for v in values], float))
            names.append(f"{name_}={category}")
            if test:
                test_columns.append(np.array([v == category for v in test_values], float))
    x = np.stack(columns, axis=1)
    x_test = np.stack(test_columns, axis=1) if test else None
    y_test = np.array(test[0][0]) if test else None
    y = np.array(labels)
    if all(_is_number(v) and float(v) == int(float(v)) for v in labels) and (
            y_test is None or all(_is_number(v) for v in y_test)):
        y = np.array([int(float(v)) for v in labels])
        y_test = None if y_test is None else np.array([int(float(v)) for v in y_test])
    return from_arrays(x, y, x_test, y_test, validation_fraction=validation_fraction,
                       test_fraction=test_fraction, seed=seed, name=name or f"csv:{path.name}",
                       feature_names=names)


def register_dataset(dataset: Dataset) -> str:
    """Makes ``dataset`` loadable by its name in this process (``load_dataset``, sweeps)."""
    if dataset.name in REGISTRY:
        raise ValueError(f"{dataset.name!r} is a built-in dataset name; pick another name")
    USER_DATASETS[dataset.name] = dataset
    return dataset.name


__all__ = ["from_arrays", "from_csv", "register_dataset"]
