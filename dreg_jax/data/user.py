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

import dataclasses
import decimal
import pathlib
import re
import warnings

import numpy as np

from dreg_jax._checks import check_choice
from dreg_jax.preprocessing import (
    TASKS,
    MISSING,
    Column,
    Preprocessing,
    formatted_number_error,
    is_formatted_number,
    is_number,
    numeric_cells,
    read_csv,
    read_csv_header,
)
from dreg_jax.data.registry import (
    REGISTRY,
    USER_DATASETS,
    Dataset,
    DatasetInfo,
    _vector_robust_sets,
    stratified_holdout,
)




def _labels(y, name):
    """``y`` as class values: ints (integer or integral float labels) or stripped strings.

    Missing markers, non-finite and non-integral numbers are refused with the row.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per row), got shape {y.shape}")
    if y.dtype.kind == "O" and all(isinstance(v, int) and not isinstance(v, bool) for v in y):
        return [int(v) for v in y]  # integers beyond int64 (from_csv): compared exactly
    if y.dtype.kind in "USO":
        values = [str(v).strip() for v in y]
        bad = [i for i, v in enumerate(values) if v.lower() in MISSING]
        if bad:
            raise ValueError(f"{name} row {bad[0]} is missing ({y[bad[0]]!r}); {len(bad)} label(s) are "
                             "missing in all: drop those rows or fill them in")
        return values
    if y.dtype.kind == "b":
        return y.astype(np.int64).tolist()
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y))
        if bad.size:
            raise ValueError(f"{name} row {int(bad[0])} is {y[bad[0]]}: a class label must be finite "
                             f"({bad.size} such label(s))")
        frac = np.flatnonzero(y != np.round(y))
        if frac.size:
            raise ValueError(f"{name} row {int(frac[0])} is {y[frac[0]]}, not a class: labels must be "
                             "integers or strings; to predict a number, pass task='regression'")
        return y.astype(np.int64).tolist()
    if y.dtype.kind in "iu":
        return y.tolist()  # Python ints: exact, uint64 ids included
    raise TypeError(f"{name} must hold integer class labels or strings, got dtype {y.dtype}")


def _encode_labels(y_train, y_test):
    """Labels are categories whatever their dtype: the sorted distinct training values map to
    ``0..C-1`` (integers in numeric order, strings in text order); the names are kept."""
    train = _labels(y_train, "y_train")
    test = None if y_test is None else _labels(y_test, "y_test")
    if test is not None and train and test and isinstance(train[0], str) != isinstance(test[0], str):
        raise ValueError("y_train and y_test hold different kinds of labels (numbers in one, strings in "
                         "the other); give both the same")
    classes = sorted(set(train))
    index = {c: i for i, c in enumerate(classes)}
    if test is not None:
        unseen = sorted(set(test) - set(classes), key=str)
        if unseen:
            raise ValueError(f"y_test has label(s) {unseen[:5]} that y_train never has; known: "
                             f"{[str(c) for c in classes][:20]}")
    encode = lambda ys: np.array([index[v] for v in ys], np.int32)  # noqa: E731
    return encode(train), None if test is None else encode(test), tuple(str(c) for c in classes)


def check_split_sizes(y, names, *, test_split: bool, validation_fraction: float, where: str):
    """Every class needs a row in training, and one in each stratified split drawn from it."""
    need = 1 + int(test_split) + int(validation_fraction > 0)
    counts = np.bincount(y, minlength=len(names))
    short = [(names[c], int(n)) for c, n in enumerate(counts) if n < need]
    if short:
        splits = " and ".join(s for s, on in (("a stratified test split", test_split),
                                              ("a validation split", validation_fraction > 0)) if on)
        shown = ", ".join(f"{n!r}: {k}" for n, k in short[:5])
        raise ValueError(f"{where}: class(es) with too few rows ({shown}); training plus {splits} need at "
                         f"least {need} rows of every class. Add rows, merge rare classes, pass a test "
                         "file, or set the validation share to 0")


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


def _targets(y, name):
    """A regression target as float64: numbers only, finite (a missing or non-finite value is
    refused with its row)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one target per row), got shape {y.shape}")
    if y.dtype.kind not in "fiu":
        raise TypeError(f"{name} holds {y.dtype} values; a regression target is a number per row (for "
                        "categories use task='classification')")
    y = y.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(y))
    if bad.size:
        raise ValueError(f"{name} row {int(bad[0])} is {y[bad[0]]}: a regression target must be finite "
                         f"({bad.size} such value(s)); drop those rows or fill them in")
    return y


def from_arrays(x_train, y_train, x_test=None, y_test=None, *, validation_fraction: float = 0.1,
                test_fraction: float = 0.2, seed: int = 0, name: str = "arrays",
                feature_names=None, label_names=None, row_lines=None, task: str = "classification") -> Dataset:
    """A :class:`Dataset` from arrays, checked, split and standardized (see the module docs).

    Args:
      x_train: training features ``(n, d)``.
      y_train: training labels ``(n,)``: integers, integral floats or strings, each distinct
        value a class (sorted; ``label_names`` keeps them).
      x_test: test features; None draws a stratified ``test_fraction`` of the training rows.
      y_test: test labels (given with ``x_test``).
      validation_fraction: stratified share of the training rows held out for validation, in [0, 1).
      seed: seed of the test and validation splits.
      name: the dataset's name (what ``register_dataset`` registers).
      feature_names: column names for messages and records (default ``x0, x1, ...``).
      label_names: names for the classes, in sorted label order (default: the labels themselves).
      row_lines: ``(train_lines, test_lines or None)``: the source line of every row, named by
        messages (``from_csv`` passes its CSV lines); default the row indices.
      task: ``"classification"`` (every distinct label a class) or ``"regression"`` (a numeric
        target: the test and validation rows are drawn at random, not stratified, and the target
        is standardized with the training rows' mean and deviation, recorded in
        ``Dataset.preprocessing``; ``num_classes`` is 1, the one output).

    Returns:
      A ``Dataset`` with ``x_val``/``y_val``, ``label_names`` and ``feature_names`` set.
    """
    check_choice("task", task, TASKS)
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
    regression = task == "regression"
    if regression:
        if label_names is not None:
            raise ValueError("label_names names classes; a regression target has none: leave it out")
        y_train = _targets(y_train, "y_train")
        y_test = None if y_test is None else _targets(y_test, "y_test")
        names, num_classes = (), 1
        if len(y_train) < 10:
            raise ValueError(f"{name}: {len(y_train)} rows; a regression needs at least 10 to train, validate and test")
    else:
        y_train, y_test, names = _encode_labels(y_train, y_test)
        if label_names is not None:
            if len(label_names) != len(names):
                raise ValueError(f"label_names has {len(label_names)} names for {len(names)} classes {list(names)}")
            names = tuple(str(n) for n in label_names)
        num_classes = len(names)
        if num_classes < 2:
            raise ValueError(f"{name}: need at least 2 classes, got {num_classes} {list(names)}")
        check_split_sizes(y_train, names, test_split=x_test is None, validation_fraction=validation_fraction,
                          where=name)

    def strata(y):  # a regression's splits are drawn from all rows at random (one stratum)
        return np.zeros(len(y), np.int64) if regression else y

    rng = np.random.default_rng(seed)
    # where each row came from, for messages: CSV lines (from_csv) or row indices
    rows_train = np.asarray(row_lines[0]) if row_lines else np.arange(len(x_train))
    rows_test = (np.asarray(row_lines[1]) if row_lines and row_lines[1] is not None
                 else None if x_test is None else np.arange(len(x_test)))
    where_train = where_test = name
    if x_test is None:
        test = stratified_holdout(strata(y_train), test_fraction, rng)
        x_train, x_test, y_train, y_test = x_train[~test], x_train[test], y_train[~test], y_train[test]
        rows_train, rows_test = rows_train[~test], rows_train[test]
    elif row_lines:
        where_test = f"{name} (test file)"
    val = stratified_holdout(strata(y_train), validation_fraction, rng)
    x_val, y_val, rows_val = x_train[val], y_train[val], rows_train[val]
    x_train, y_train, rows_train = x_train[~val], y_train[~val], rows_train[~val]
    constant = [feature_names[c] for c in np.flatnonzero(x_train.std(axis=0) == 0)]
    if constant:
        warnings.warn(f"{name}: constant training column(s) {constant[:10]} carry no information "
                      "(kept; standardized to 0)", UserWarning, stacklevel=2)
    preprocessing = Preprocessing.fit(x_train, [Column(n) for n in feature_names], names,
                                      y_train=y_train if regression else None)
    word = "line" if row_lines else "row"
    x_train, x_test, x_val = (preprocessing.standardize(x, where=where, rows=rows, row_word=word)
                              for x, where, rows in ((x_train, where_train, rows_train),
                                                     (x_test, where_test, rows_test), (x_val, where_train, rows_val)))
    info = DatasetInfo(name, "tabular", num_classes, "user", x_train.shape[1])
    if regression:
        y_train, y_test, y_val = (preprocessing.standardize_target(y) for y in (y_train, y_test, y_val))
    else:
        y_test, y_val = y_test.astype(np.int32), y_val.astype(np.int32)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, "tabular",
                   _vector_robust_sets(x_test), info, None, x_val=x_val, y_val=y_val,
                   label_names=names, feature_names=feature_names, preprocessing=preprocessing, task=task)


#: A text column with a distinct value in at least this share of its rows (and >= 20 rows) is an
#: identifier (a name, an id), not a category: refused, with the advice to drop it.
ID_LIKE_SHARE = 0.9
#: A cell written as an integer (the identifier rule reads such columns).
INTEGER = re.compile(r"[+-]?[0-9]+")
#: A column whose cells are numbers in at least this share of rows is numeric: its other cells
#: are stray tokens, refused with their count and first line (impute them or drop the column).
NUMERIC_SHARE = 0.5


def _csv_labels(values, lines, path, target):
    """The target column as class values (ints when every label is an integer), by CSV line."""
    out = []
    for v, line in zip(values, lines):
        if v.lower() in MISSING:
            raise ValueError(f"{path}: target column {target!r} line {line} is missing ({v!r}); drop that "
                             "row or fill it in")
        if is_number(v):  # read as an exact decimal: ids past 2**53 stay distinct
            number = decimal.Decimal(v)
            if not np.isfinite(float(v)) or number != number.to_integral_value():
                raise ValueError(f"{path}: target column {target!r} line {line} is {v!r}, not a class label "
                                 "(labels are integers or names); to predict a number, pass --task regression (task='regression')")
            out.append(int(number))
        else:
            out.append(v)
    kinds = {type(v) for v in out}
    return [str(v) for v in out] if len(kinds) > 1 else out


def _columns(header, rows, lines, target, path, drop, task="classification"):
    if target not in header:
        raise ValueError(f"target column {target!r} is not in {path}; its columns: {', '.join(header)}")
    unknown = sorted(set(drop) - set(header))
    if unknown:
        raise ValueError(f"--drop names column(s) {unknown} that {path} does not have; its columns: "
                         f"{', '.join(header)}")
    if target in drop:
        raise ValueError(f"{path}: {target!r} is the target column; it cannot be dropped")
    t = header.index(target)
    cells = [row[t].strip() for row in rows]
    if task == "regression":  # a number per row, refused with its line otherwise
        labels = numeric_cells(cells, lines, str(path), target)
    else:
        labels = _csv_labels(cells, lines, path, target)
        _refuse_continuous_target(labels, path, target)
    features = [(name, [row[i].strip() for row in rows]) for i, name in enumerate(header)
                if i != t and name not in drop]
    if not features:
        raise ValueError(f"{path} has no feature column left besides the target {target!r}")
    return labels, features


#: A numeric target with more distinct values than this (and than CONTINUOUS_SHARE of its rows,
#: or with a non-integer value) reads as a measurement, not as classes.
CONTINUOUS_DISTINCT = 20
CONTINUOUS_SHARE = 0.02


def _refuse_continuous_target(labels, path, target):
    """Every distinct label is a class: a numeric column with many distinct values (an age, a
    price) would become dozens of rare classes, so it is refused with what to do instead."""
    numbers = [v for v in labels if isinstance(v, (int, float)) or (isinstance(v, str) and is_number(v))]
    if len(numbers) != len(labels) or not labels:
        return
    values = [float(v) for v in numbers]
    distinct = len(set(values))
    fractional = any(not v.is_integer() for v in values)
    if distinct > CONTINUOUS_DISTINCT and (fractional or distinct > CONTINUOUS_SHARE * len(values)):
        raise ValueError(f"{path}: target {target!r} looks continuous ({distinct} distinct numeric values in "
                         f"{len(values)} rows, from {min(values):g} to {max(values):g}): predict it as a number with "
                         "--task regression (task='regression'), or bin it into a few classes first (pandas.cut)")


def _numeric_column(name, values, lines, path, keep=()):
    """The column as float64 if it is numeric; None if it is categorical; refuses the rest."""
    formatted = [i for i, v in enumerate(values) if is_formatted_number(v)]
    if formatted:
        i = formatted[0]
        raise formatted_number_error(str(path), name, lines[i], values[i])
    numeric = [is_number(v) and v.lower() not in MISSING for v in values]
    missing = [i for i, v in enumerate(values) if v.lower() in MISSING]
    if missing:
        i = missing[0]
        raise ValueError(f"{path}: column {name!r} line {lines[i]} is missing ({values[i]!r}); "
                         f"{len(missing)} cell(s) in all: impute or drop them (or --drop {name})")
    if all(numeric):
        x = np.array([float(v) for v in values])
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size:
            raise ValueError(f"{path}: column {name!r} line {lines[bad[0]]} is {values[bad[0]]!r}, not a "
                             f"finite number ({bad.size} such cell(s))")
        integers = [int(v) for v in values] if all(INTEGER.fullmatch(v) for v in values) else None
        if name not in keep and len(x) >= 20 and integers is not None and len(set(integers)) == len(integers):
            low, high = min(integers), max(integers)
            what = "numbers the rows" if high - low == len(x) - 1 else "holds a different integer in every row"
            raise ValueError(f"{path}: column {name!r} {what} ({low}..{high}, each once): a row "
                             f"index or an id, not a feature (it can leak the row order); drop it with --drop "
                             f"{name} (from_csv(drop=[{name!r}])), or --keep {name} if it is a real feature")
        return x
    if sum(numeric) >= NUMERIC_SHARE * len(values):
        stray = [i for i, ok in enumerate(numeric) if not ok]
        raise ValueError(f"{path}: column {name!r} is numeric in {sum(numeric)} of {len(values)} rows but has "
                         f"{len(stray)} other cell(s), the first {values[stray[0]]!r} on line {lines[stray[0]]}: "
                         f"fix or impute them, or --drop {name}")
    distinct = len(set(values))
    if name not in keep and len(values) >= 20 and distinct >= ID_LIKE_SHARE * len(values):
        raise ValueError(f"{path}: column {name!r} has {distinct} distinct values in {len(values)} rows: an "
                         f"identifier (a name or an id), not a category; drop it with --drop {name} "
                         f"(from_csv(drop=[{name!r}])), or --keep {name} to one-hot encode it anyway")
    return None


def from_csv(path, target: str, *, test_csv=None, validation_fraction: float = 0.1,
             test_fraction: float = 0.2, seed: int = 0, name: str | None = None, drop=(), keep=(),
             encoding: str = "utf-8-sig", task: str = "classification") -> Dataset:
    """A :class:`Dataset` from a CSV with a header row; ``target`` names the label column.

    Rules (each refusal names the file, the column and the CSV line):

    * the target is a category column whatever it holds: integer labels (``200``, ``404`` or
      ``1.0``) and names map to ``0..C-1`` in sorted order, kept in ``label_names``; missing
      markers, non-integral and non-finite numbers in it are refused;
    * a column name used twice, or a column without a name, is refused;
    * a feature column whose cells are all numbers is numeric (one that numbers the rows 1..n is
      refused as a row index); a column numeric in most rows
      with some other cells is refused (its stray tokens are counted); any other column is
      categorical and one-hot encoded with the training categories, unless it holds a distinct
      value in nearly every row (an identifier), which is refused;
    * missing cells (``MISSING``: empty, NA, N/A, NaN, null, none, ?, -) and infinite values
      are refused; ``drop`` removes columns before any of this;
    * values are standardized in float64 with the training statistics (huge magnitudes scaled
      first, so nothing overflows);
    * every class needs enough rows for its stratified test and validation splits.

    Args:
      path: the CSV file (``encoding``: its text encoding, default UTF-8 with or without BOM).
      target: the label column.
      test_csv: a test file with the same columns (any order); else a stratified
        ``test_fraction`` of the rows is held out.
      drop: columns to leave out (ids, names, leakage).
      keep: columns the identifier rule would refuse (a distinct integer or text in every row)
        that are real features: kept.
      task: ``"regression"`` reads the target as a number per row (missing or non-numeric cells
        refused with their line) and predicts it (:func:`from_arrays`); ``"classification"``
        (the default) reads it as classes.
    """
    check_choice("task", task, TASKS)
    path = pathlib.Path(path)
    drop, keep = tuple(drop), tuple(keep)
    unknown = sorted(set(keep) - set(read_csv_header(path, encoding))) if keep else []
    if unknown:
        raise ValueError(f"--keep names column(s) {unknown} that {path} does not have")
    header, rows, lines = read_csv(path, encoding)
    labels, features = _columns(header, rows, lines, target, path, drop, task)
    test = None
    if test_csv is not None:
        test_csv = pathlib.Path(test_csv)
        test_header, test_rows, test_lines = read_csv(test_csv, encoding)
        if sorted(test_header) != sorted(header):
            raise ValueError(f"{test_csv} has columns {test_header}, {path} has {header}")
        test_labels, test_features = _columns(test_header, test_rows, test_lines, target, test_csv, drop, task)
        test = (test_labels, dict(test_features), test_lines)
    columns, names, test_columns, raw_columns = [], [], [], []
    for name_, values in features:
        numeric = _numeric_column(name_, values, lines, path, keep)
        test_values = test[1][name_] if test else None
        if numeric is not None:
            columns.append(numeric)
            names.append(name_)
            raw_columns.append(Column(name_))
            if test:
                test_columns.append(numeric_cells(test_values, test[2], str(test_csv), name_))
            continue
        categories = sorted(set(values))  # categorical: one-hot with the training categories
        raw_columns.append(Column(name_, tuple(categories)))
        if test:
            unseen = [(i, v) for i, v in enumerate(test_values) if v not in categories]
            if unseen:
                i, v = unseen[0]
                raise ValueError(f"{test_csv}: column {name_!r} line {test[2][i]} has category {v!r} that "
                                 f"{path} never has; known: {categories[:20]}")
        for category in categories:
            columns.append(np.array([v == category for v in values], float))
            names.append(f"{name_}={category}")
            if test:
                test_columns.append(np.array([v == category for v in test_values], float))
    x = np.stack(columns, axis=1)
    x_test = np.stack(test_columns, axis=1) if test else None
    y_test = None
    if test:
        y_test = test[0]
    if test and task == "classification":
        if {type(v) for v in labels} != {type(v) for v in y_test}:  # "1" in one file, 1 in the other
            labels, y_test = [str(v) for v in labels], [str(v) for v in y_test]
        y_test = np.array(y_test, dtype=object if _all_ints(y_test) else None)
    y = labels if task == "regression" else np.array(labels, dtype=object if _all_ints(labels) else None)
    ds = from_arrays(x, y, x_test, y_test, task=task, validation_fraction=validation_fraction,
                     test_fraction=test_fraction, seed=seed, name=name or f"csv:{path.name}",
                     feature_names=names, row_lines=(lines, test[2] if test else None))
    # the raw columns (numeric or their categories) replace from_arrays' all-numeric view, so
    # new rows of this CSV's shape can be encoded the same way (Dataset.preprocessing)
    record = dataclasses.replace(ds.preprocessing, columns=tuple(raw_columns), target=target, drop=drop)
    return dataclasses.replace(ds, preprocessing=record)


def _all_ints(values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def register_dataset(dataset: Dataset) -> str:
    """Makes ``dataset`` loadable by its name in this process (``load_dataset``, sweeps)."""
    if dataset.name in REGISTRY:
        raise ValueError(f"{dataset.name!r} is a built-in dataset name; pick another name")
    USER_DATASETS[dataset.name] = dataset
    return dataset.name


__all__ = ["from_arrays", "from_csv", "register_dataset"]
