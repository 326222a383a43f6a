r"""How raw table rows become model inputs, as a record that travels with a saved model.

A :class:`Preprocessing` holds what ``from_csv``/``from_arrays`` learned from the training rows:

* the raw feature columns in order, each numeric or categorical (its training categories,
  one-hot encoded as ``column=value`` in that order);
* the standardization of every encoded feature, :math:`z = (x / s - \mu) / \sigma` with the
  training split's scale :math:`s` (1 except for huge magnitudes), mean :math:`\mu` and
  deviation :math:`\sigma` (1 for a constant column);
* the label names (class index -> original label), the target column and the dropped columns;
* for a regression target, its training mean :math:`\mu_y` and deviation :math:`\sigma_y`: the
  model learns :math:`(y - \mu_y) / \sigma_y` and :meth:`Preprocessing.target_values` maps its
  output back, :math:`y = \mu_y + \sigma_y \hat z`.

:meth:`Preprocessing.transform_csv` applies it to new rows with the same rules as training
(missing markers, non-finite numbers, unseen categories, missing or unknown columns are refused
with the file, the column and the CSV line) and gives the arrays training saw, bit for bit.

The CSV reading rules (:func:`read_csv`, :data:`MISSING`) live here, so training and prediction
read a file the same way. Pure numpy and the standard library.
"""
from __future__ import annotations

import csv
import dataclasses
import pathlib
import re

import numpy as np

#: What a table's target is: classes (``classification``) or a number (``regression``); the
#: training side of each is :mod:`dreg_jax.training.tasks`.
TASKS = ("classification", "regression")

#: Cells read as missing (compared lowercased, after stripping spaces).
MISSING = {"", "na", "n/a", "#n/a", "nan", "null", "none", "?", "-", "--"}

#: Version of the record's dict layout (:meth:`Preprocessing.to_dict`); 2 added the task and the
#: target's standardization, and is written for regressions only (a classification's record keeps
#: the version 1 layout, so older releases read it).
PREPROCESSING_VERSION = 2
READABLE_PREPROCESSING_VERSIONS = (1, 2)


#: The one rule for a number in a cell: plain decimal notation with an optional sign, fraction
#: and exponent (``12``, ``-0.5``, ``.5``, ``1e-3``), or an infinity/NaN word (read, then refused
#: as not finite). Python's ``float`` accepts more (``1_0``, spaces); this rule does not.
NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
NONFINITE_WORDS = {"inf", "+inf", "-inf", "infinity", "+infinity", "-infinity", "nan", "+nan", "-nan"}
#: Cells that are numbers written for people: ``1,000``, ``10%``, ``$5``. Refused with the fix.
FORMATTED_NUMBER = re.compile(r"[+-]?[$\u20ac\u00a3]?(?:[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?|[0-9]+(?:\.[0-9]*)?%|"
                              r"[0-9]+(?:\.[0-9]*)?)")
#: Longest cell read (Python's csv default); a longer one is refused with its line.
MAX_CELL = 131072


def is_number(text: str) -> bool:
    """Whether ``text`` is a number by :data:`NUMBER` (surrounding spaces allowed)."""
    text = text.strip()
    return NUMBER.fullmatch(text) is not None or text.lower() in NONFINITE_WORDS


def is_formatted_number(text: str) -> bool:
    """``1,000``, ``10%``, ``$5``: a number with separators, a percent or a currency sign."""
    text = text.strip()
    return not is_number(text) and FORMATTED_NUMBER.fullmatch(text) is not None


def formatted_number_error(where: str, column: str, line: int, value: str) -> ValueError:
    return ValueError(f"{where}: column {column!r} line {line} is {value!r}, a number written with a "
                      "separator, percent or currency sign; write it plainly (1,000 -> 1000, 10% -> 0.10, "
                      f"$5 -> 5) or leave the column out with --drop {column}")


def iter_csv(path, encoding: str = "utf-8-sig", chunk_rows: int = 65536):
    """``(header, rows, lines)`` chunks of at most ``chunk_rows`` data rows of a CSV with a header
    row (memory bounded by the chunk), by the rules of :func:`read_csv`; the header comes checked
    with every chunk."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ValueError(f"CSV file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"CSV file {path} is a directory")
    line = 1
    any_rows = False
    try:
        with open(path, newline="", encoding=encoding) as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                raise ValueError(f"CSV file {path} is empty") from None
            header = _checked_header(header, path)
            rows, lines = [], []
            for row in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{path}:{line}: {len(row)} cells, the header has {len(header)}")
                rows.append(row)
                lines.append(line)
                if len(rows) == chunk_rows:
                    any_rows = True
                    yield header, rows, lines
                    rows, lines = [], []
            if rows or not any_rows:
                if not rows:
                    raise ValueError(f"CSV file {path} has a header but no rows")
                yield header, rows, lines
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not {encoding} text after line {line} (byte {err.object[err.start:err.start + 1]!r} "
                         f"at offset {err.start}); pass its encoding, e.g. --encoding latin-1") from None
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r} for {path}; e.g. utf-8, latin-1, cp1252") from None
    except csv.Error as err:
        reason = (f"a cell longer than {MAX_CELL} characters (an unclosed quote?)" if "field larger" in str(err)
                  else str(err))
        raise ValueError(f"{path}: after line {line}: {reason}") from None


def _checked_header(header, path):
    header = [h.strip() for h in header]
    unnamed = [i + 1 for i, h in enumerate(header) if not h]
    if unnamed:
        raise ValueError(f"{path}: column(s) {unnamed} have no name in the header; name or drop them")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise ValueError(f"{path}: column name(s) {dupes} appear more than once in the header; rename "
                         "or drop the copies (each column must be read from one place)")
    return header


def read_csv_header(path, encoding: str = "utf-8-sig") -> list:
    """The checked header of a CSV (its first data row is read, and the file closed)."""
    chunks = iter_csv(path, encoding, chunk_rows=1)
    try:
        header, _, _ = next(chunks)
    finally:
        chunks.close()
    return header


def read_csv(path, encoding: str = "utf-8-sig"):
    """``(header, rows, lines)`` of a CSV with a header row: the CSV line of every data row,
    blank lines skipped; refuses ragged rows, unnamed and repeated columns, bad encodings and
    cells over :data:`MAX_CELL` characters, each with the file and the line."""
    header, rows, lines = None, [], []
    for header, chunk, chunk_lines in iter_csv(path, encoding, chunk_rows=2**62):
        rows += chunk
        lines += chunk_lines
    return header, rows, lines


def numeric_cells(values, lines, where: str, column: str) -> np.ndarray:
    """A numeric column's cells as float64; refuses a missing, non-number or non-finite cell."""
    out = np.empty(len(values))
    for i, v in enumerate(values):
        if is_formatted_number(v):
            raise formatted_number_error(where, column, lines[i], v)
        if v.lower() in MISSING or not is_number(v) or not np.isfinite(float(v)):
            raise ValueError(f"{where}: column {column!r} line {lines[i]} is {v!r}, not a finite number "
                             "(the model was trained on numbers in this column)")
        out[i] = float(v)
    return out


def standardization(x_train, per_feature: bool = True):
    r"""``(scale, mean, std)`` of the training features, what :func:`apply_standardization` applies:
    :math:`z = (x / s - \mu) / \sigma`.

    ``scale`` is 1 except for columns holding values from about 1e154 up, which would overflow
    the variance in float64 and erase the column; they are first divided by their largest
    training magnitude (the standardized values are the same up to rounding). A constant column
    gets ``std = 1`` (it standardizes to 0).
    """
    axis = 0 if per_feature else None
    x_train = np.asarray(x_train)
    scale = np.max(np.abs(x_train.astype(np.float64)), axis=axis) if x_train.size else 1.0
    scale = np.where(np.isfinite(scale) & (scale > 1e150), scale, 1.0)
    if np.any(scale != 1.0):
        x_train = x_train / scale
    mean = x_train.mean(axis=axis)
    std = x_train.std(axis=axis)
    return scale, mean, np.where(std > 0, std, 1.0)


def apply_standardization(x, stats):
    """``x`` standardized with :func:`standardization`'s ``stats`` (float32). Ordinary columns
    take the plain arithmetic ``(x - mean) / std``, bit for bit."""
    scale, mean, std = stats
    if np.any(np.asarray(scale) != 1.0):
        x = np.asarray(x, np.float64) / scale
    return ((x - mean) / std).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Column:
    """One raw feature column: numeric (``categories`` None) or categorical (its training
    categories, one one-hot feature each, in this order)."""

    name: str
    categories: tuple | None = None

    @property
    def feature_names(self) -> tuple:
        return (self.name,) if self.categories is None else tuple(f"{self.name}={c}" for c in self.categories)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Raw rows -> standardized model inputs, and class indices -> labels (see the module docs).

    Attributes:
      columns: the raw feature columns, in the order their encoded features appear.
      scale, mean, std: per encoded feature, from the training split (:func:`standardization`).
      label_names: class index -> original label.
      target: the label column of the CSV (None for arrays); a new CSV may hold it (ignored).
      drop: columns left out at training; a new CSV may hold them (ignored).
      dtype: the training features' dtype before standardizing (new rows take it too, so the
        arithmetic is the same).
      task: ``"classification"`` or ``"regression"``.
      target_mean, target_std: a regression target's training mean and deviation (None for
        classification).
    """

    columns: tuple
    scale: tuple
    mean: tuple
    std: tuple
    label_names: tuple
    target: str | None = None
    drop: tuple = ()
    dtype: str = "float64"
    task: str = "classification"
    target_mean: float | None = None
    target_std: float | None = None

    @classmethod
    def fit(cls, x_train, columns, label_names, *, target=None, drop=(), y_train=None) -> "Preprocessing":
        """The record for encoded training features ``x_train`` ``(n, d)``; ``y_train`` (a
        regression's raw target, float) adds its standardization (:meth:`standardize_target`)."""
        x_train = np.asarray(x_train)
        scale, mean, std = standardization(x_train)
        width = sum(len(c.feature_names) for c in columns)
        if width != x_train.shape[1]:
            raise ValueError(f"the columns encode {width} features, x_train has {x_train.shape[1]}")
        as_tuple = lambda a: tuple(float(v) for v in np.broadcast_to(a, (width,)))  # noqa: E731
        record = cls(tuple(columns), as_tuple(scale), as_tuple(mean), as_tuple(std),
                     tuple(str(n) for n in label_names), target, tuple(drop), str(x_train.dtype))
        if y_train is None:
            return record
        y_train = np.asarray(y_train, np.float64)
        deviation = float(y_train.std())
        if not deviation > 0:
            raise ValueError(f"the regression target is constant in the training rows ({y_train[0]:g}): nothing "
                             "to learn")
        return dataclasses.replace(record, label_names=(), task="regression", target_mean=float(y_train.mean()),
                                   target_std=deviation)

    def standardize_target(self, y) -> np.ndarray:
        """A regression's raw target -> what the model learns, :math:`(y - \\mu_y) / \\sigma_y` (float32)."""
        return ((np.asarray(y, np.float64) - self.target_mean) / self.target_std).astype(np.float32)

    def target_values(self, outputs) -> np.ndarray:
        """The model's standardized outputs -> the target's own units,
        :math:`\\mu_y + \\sigma_y \\hat z` (float64)."""
        return self.target_mean + self.target_std * np.asarray(outputs, np.float64)

    @property
    def feature_names(self) -> tuple:
        return tuple(n for c in self.columns for n in c.feature_names)

    @property
    def num_features(self) -> int:
        return len(self.mean)

    def standardize(self, x, *, where: str = "the data", rows=None, row_word: str = "line") -> np.ndarray:
        """Encoded features ``(n, d)`` -> the standardized float32 inputs the model takes.

        A value that standardizes beyond float32 (e.g. ``1e300`` in a column whose training
        values are near 1) is refused, naming ``where``, the column and ``rows[i]`` (CSV lines).
        """
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected encoded features of shape (rows, {self.num_features}) "
                             f"({', '.join(self.feature_names[:8])}{', ...' if self.num_features > 8 else ''}), "
                             f"got {x.shape}")
        dtype = np.dtype(self.dtype)
        stats = tuple(np.asarray(v, dtype) for v in (self.scale, self.mean, self.std))
        with np.errstate(over="ignore", invalid="ignore"):
            z = apply_standardization(x.astype(dtype), stats)
        bad = np.argwhere(~np.isfinite(z))
        if bad.size:
            r, c = bad[0]
            row = f"{row_word} {rows[r]}" if rows is not None else f"row {r}"
            raise ValueError(f"{where}: column {self.feature_names[c]!r} {row} is {x[r, c]:g}, which standardizes "
                             f"beyond float32 (training mean {self.mean[c]:g}, deviation {self.std[c]:g}); fix the "
                             "cell (a unit or entry error?) or leave the column out")
        return z

    def encode_table(self, header, rows, lines, where: str) -> np.ndarray:
        """Raw CSV cells -> encoded float64 features (not standardized), by the training rules.

        The columns may come in any order; the target and dropped columns are ignored; a
        missing or unknown column, a bad number or an unseen category is refused in one line.
        """
        index = {name: i for i, name in enumerate(header)}
        needed = [c.name for c in self.columns]
        missing = [n for n in needed if n not in index]
        if missing:
            raise ValueError(f"{where} lacks column(s) {missing} that the model was trained on; its "
                             f"columns: {', '.join(header)}")
        known = set(needed) | set(self.drop) | ({self.target} if self.target else set())
        unknown = [n for n in header if n not in known]
        if unknown:
            raise ValueError(f"{where} has column(s) {unknown} the model was not trained on; remove them "
                             f"(the model reads: {', '.join(needed)})")
        blocks = []
        for column in self.columns:
            values = [row[index[column.name]].strip() for row in rows]
            if column.categories is None:
                blocks.append(numeric_cells(values, lines, where, column.name)[:, None])
                continue
            known_categories = set(column.categories)
            for i, v in enumerate(values):
                if v not in known_categories:
                    raise ValueError(f"{where}: column {column.name!r} line {lines[i]} has category {v!r} "
                                     f"that training never saw; known: {list(column.categories)[:20]}")
            blocks.append(np.stack([np.array([v == c for v in values], float) for c in column.categories], 1))
        return np.concatenate(blocks, axis=1)

    def transform_csv(self, path, encoding: str = "utf-8-sig"):
        """``(x, lines)``: the standardized inputs of every row of a CSV, and their CSV lines."""
        header, rows, lines = read_csv(path, encoding)
        return self.standardize(self.encode_table(header, rows, lines, str(path)), where=str(path), rows=lines), lines

    def transform_csv_chunks(self, path, encoding: str = "utf-8-sig", chunk_rows: int = 65536):
        """``(x, lines)`` chunks of :meth:`transform_csv` (memory bounded by ``chunk_rows``)."""
        for header, rows, lines in iter_csv(path, encoding, chunk_rows):
            yield self.standardize(self.encode_table(header, rows, lines, str(path)), where=str(path), rows=lines), lines

    def label(self, indices) -> list:
        """Class indices -> the original labels."""
        return [self.label_names[int(i)] for i in np.asarray(indices).reshape(-1)]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["columns"] = [{"name": c.name, "categories": None if c.categories is None else list(c.categories)}
                        for c in self.columns]
        if self.task == "classification":  # the version 1 layout: read by every dreg_jax
            for name in ("task", "target_mean", "target_std"):
                del d[name]
            return {"version": 1, **d}
        return {"version": PREPROCESSING_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        d = dict(d)
        version = d.pop("version", None)
        if version not in READABLE_PREPROCESSING_VERSIONS:
            raise ValueError(f"preprocessing record version {version!r}; this dreg_jax reads version(s) "
                             f"{', '.join(map(str, READABLE_PREPROCESSING_VERSIONS))} (upgrade dreg_jax, or retrain)")
        columns = tuple(Column(c["name"], None if c["categories"] is None else tuple(c["categories"]))
                        for c in d.pop("columns"))
        return cls(columns=columns, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


__all__ = ["MISSING", "NUMBER", "TASKS", "Column", "Preprocessing", "apply_standardization", "formatted_number_error",
           "is_formatted_number", "is_number", "iter_csv", "numeric_cells", "read_csv", "read_csv_header",
           "standardization"]
