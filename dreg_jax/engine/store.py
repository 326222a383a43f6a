"""The results store: one JSON row per finished run, appended by the writer, read by everyone.

See :mod:`dreg_jax.engine.sweep` for the guarantees (torn lines, locks, readers that never
write, rows from newer versions). ``flat_row`` turns a row into one flat table row.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import sys
from typing import Sequence


from dreg_jax._files import atomic_write, exclusive_lock, write_all
from dreg_jax.engine.specs import RunSpec
from dreg_jax.training.config import (
    ModelConfig,
    OptimizerConfig,
    RegularizerConfig,
    TrainConfig,
)

STATUSES = ("ok", "failed", "diverged")


def record_problem(record) -> str | None:
    """Why ``record`` is not a valid results row (None when it is)."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a results row (an object)"
    for field, kind in (("run_id", str), ("spec", dict), ("status", str), ("metrics", dict)):
        if field not in record:
            return f"row has no {field!r}"
        if not isinstance(record[field], kind):
            return f"row field {field!r} is a {type(record[field]).__name__}, expected {kind.__name__}"
    if record["status"] not in STATUSES:
        return f"row status {record['status']!r} is not one of {', '.join(STATUSES)}"
    if record["status"] == "ok" and not {"test_accuracy", "test_r2"} & set(record["metrics"]):
        return "ok row has no metrics.test_accuracy (or a regression's test_r2)"
    problem = _metric_problem(record["metrics"])
    if problem:
        return problem
    problem = _spec_shape_problem(record["spec"])  # every reader needs these, newer rows included
    if problem:
        return problem
    if _newer_fields(record["spec"]):
        return None  # a row from a newer version: its id cannot be recomputed here; kept as is
    try:
        run_id = RunSpec.from_dict(record["spec"]).run_id
    except (KeyError, TypeError, ValueError) as err:
        return f"row spec cannot be read ({type(err).__name__}: {err})"
    if run_id != record["run_id"]:
        return f"row spec hashes to {run_id}, not its run_id {record['run_id']}"
    return None


def _metric_problem(metrics: dict) -> str | None:
    """Every metric is a number (or null/NaN: a diverged run), lists and dicts of numbers
    included; an accuracy is a share in [0, 1]."""
    for name, value in metrics.items():
        values = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
        for v in values:
            if v is None or isinstance(v, float) and v != v:  # null or NaN: a diverged run (older files)
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return f"metrics.{name} holds {str(v)[:40]!r}, not a number"
            if "accuracy" in name and not 0.0 <= v <= 1.0:
                return f"metrics.{name} is {v}, outside [0, 1] (accuracies are stored as shares, not percent)"
    return None


def _spec_shape_problem(spec: dict) -> str | None:
    for field in ("dataset", "seed", "data_fraction", "label_noise", "input_noise"):
        if field not in spec:
            return f"row spec has no {field!r}"
    config = spec.get("config")
    if not isinstance(config, dict):
        return "row spec has no config (an object)"
    for part in ("model", "regularizer", "optimizer"):
        if not isinstance(config.get(part), dict):
            return f"row spec.config has no {part!r} (an object)"
    for field in ("epochs", "batch_size"):
        if field not in config:
            return f"row spec.config has no {field!r}"
    if "kind" not in config["regularizer"] or "activation" not in config["model"] or \
            "hidden" not in config["model"] or "learning_rate" not in config["optimizer"]:
        return "row spec.config lacks its regularizer kind, activation, hidden widths or learning rate"
    return None


def _same_result(a: dict, b: dict) -> bool:
    """Two rows of one run say the same (what a repeated append writes): status, metrics, curves."""
    return all(a.get(k) == b.get(k) for k in ("status", "metrics", "curves"))


def _newer_fields(spec: dict) -> list[str]:
    """Spec fields that this version's dataclasses do not have (a row written by newer code)."""
    known = {
        (): {f.name for f in dataclasses.fields(RunSpec)},
        ("config",): {f.name for f in dataclasses.fields(TrainConfig)},
        ("config", "model"): {f.name for f in dataclasses.fields(ModelConfig)},
        ("config", "regularizer"): {f.name for f in dataclasses.fields(RegularizerConfig)},
        ("config", "optimizer"): {f.name for f in dataclasses.fields(OptimizerConfig)},
    }
    unknown = []
    for path, names in known.items():
        node = spec
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            unknown += [".".join(path + (k,)) for k in node if k not in names]
    return unknown


class NotAResultsFile(ValueError):
    """A file with lines but no valid results row: refused, and left untouched."""


class ResultsFile:
    """Append-only JSON-lines results; see the module docstring.

    ``load()`` (readers) returns every valid row, reports each bad line with its file and line,
    and changes nothing. ``load(repair=True)`` (the writer, under its lock) also moves bad lines
    to ``<file>.rejected`` (one JSON object per line: line number, reason, text) and rewrites the
    results file without them, so the run a torn line shadowed is redone.
    """

    def __init__(self, path, *, log=None):
        self.path = pathlib.Path(path)
        self.real_path = self.path.resolve()  # a symlink's target: what is written and locked
        self.rejected_path = self.real_path.with_name(self.real_path.name + ".rejected")
        self.lock_path = self.real_path.with_name(self.real_path.name + ".lock")
        self.log = log or (lambda message: print(message, file=sys.stderr))

    def check_writable(self):
        """Raise now (before any compute) if results cannot be appended to this path."""
        if self.path.is_dir():
            raise OSError(f"results path {self.path} is a directory; pass a file, e.g. {self.path / 'results.jsonl'}")
        if self.path.exists() and not self.path.stat().st_mode & 0o222:
            raise OSError(f"results file {self.path} is read-only; make it writable (chmod u+w) or "
                          "pass another --results file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        except OSError as err:
            raise OSError(f"results file {self.path} cannot be written: {err.strerror or err}") from None

    def load(self, *, repair: bool = False) -> dict:
        """``run_id -> record`` of every valid row (the first, if a run appears twice).

        Raises :class:`NotAResultsFile` (and changes nothing) when the file has complete lines
        but not one valid row. ``repair`` (the writer only) sets bad lines aside.
        """
        if not self.real_path.exists():
            return {}
        raw = self.real_path.read_bytes()
        lines = raw.split(b"\n")
        unterminated = lines.pop() if lines else b""  # b"" when the file ends with a newline
        records, kept, rejected = {}, [], []
        lines_of: dict = {}  # run_id -> line numbers of its kept rows, the first row's first
        conflicting: set = set()
        numbered = [(n, line, True) for n, line in enumerate(lines, 1)]
        if unterminated.strip():
            numbered.append((len(lines) + 1, unterminated, False))
        for number, line, terminated in numbered:
            if not line.strip():
                kept.append((number, line))
                continue
            try:
                record = json.loads(line.decode("utf-8"))
                problem = record_problem(record)
            except UnicodeDecodeError:
                problem = "binary bytes, not UTF-8 text"
            except json.JSONDecodeError as err:
                problem = ("an unterminated last line that does not parse (a write cut short)"
                           if not terminated else f"not valid JSON ({err.msg} at column {err.colno})")
            if problem:
                rejected.append((number, line, problem))
                continue
            run_id = record["run_id"]
            if run_id in lines_of:
                if run_id in conflicting or not _same_result(records[run_id], record):
                    conflicting.add(run_id)  # one run, two different results: neither can be trusted
                    rejected.append((number, line, f"run {run_id} appears again with other results than "
                                                   f"on line {lines_of[run_id][0]}"))
                    continue
                kept.append((number, line))  # an identical duplicate: harmless, left in place
                lines_of[run_id].append(number)
                continue
            kept.append((number, line))
            lines_of[run_id] = [number]
            records[run_id] = record
        for run_id in conflicting:  # its other rows go too (the run is redone by a writer)
            del records[run_id]
            gone = set(lines_of[run_id])
            rejected += [(number, line, f"run {run_id} has rows with different results; none is kept")
                         for number, line in kept if number in gone]
            kept = [(number, line) for number, line in kept if number not in gone]
        rejected.sort(key=lambda item: item[0])
        kept = [line for _, line in kept]
        complete_bad = [(n, p) for n, _, p in rejected if n <= len(lines)]
        if not records and complete_bad:
            number, problem = complete_bad[0]
            raise NotAResultsFile(
                f"{self.path} is not a dreg_jax results file (line {number}: {problem}; no line is a "
                "results row); it was left untouched. Pass a results .jsonl written by dreg-jax sweep/train")
        if rejected and repair:
            self._set_aside(rejected)
            self._rewrite(kept)
        elif rejected:
            for number, _, problem in rejected:
                self.log(f"{self.path}:{number}: {problem}; skipped (the file is left as it is)")
        elif unterminated.strip() and repair:  # a valid last row without its newline: terminate it
            with open(self.real_path, "ab") as f:
                f.write(b"\n")
            self.log(f"{self.path}:{len(lines) + 1}: valid last row had no trailing newline; added one")
        return records

    def writer_lock(self):
        """The writer's lock (``<file>.lock`` beside the real file, never through a planted link)."""
        return exclusive_lock(self.lock_path, holder=f"another sweep is writing {self.real_path}")

    def _set_aside(self, rejected):
        data = "".join(json.dumps({"file": str(self.path), "line": number, "reason": problem,
                                   "text": line.decode("utf-8", errors="backslashreplace"),
                                   "set_aside_at": utc_now()}) + "\n" for number, line, problem in rejected)
        try:  # appended, never through a link planted at its name
            fd = os.open(self.rejected_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise OSError(f"{self.rejected_path} cannot be written ({err.strerror}): a link or an unwritable "
                          "file sits there; remove it so bad rows can be set aside") from None
        try:
            write_all(fd, data.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        for number, _, problem in rejected:
            self.log(f"{self.path}:{number}: {problem}; moved to {self.rejected_path} "
                     "(the run is redone if this sweep contains it)")

    def _rewrite(self, lines):
        atomic_write(self.real_path, b"".join(line + b"\n" for line in lines if line.strip()), what="results file")

    def append(self, records: Sequence[dict]):
        if not records:
            return
        data = "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in records).encode()
        self.real_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.real_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


CONFIG_COLUMNS = ("dataset", "activation", "hidden", "regularizer", "strength", "learning_rate",
                  "epochs", "batch_size", "seed", "data_fraction", "label_noise", "input_noise")


def flat_row(record: dict) -> dict:
    """One results record as a flat dict (see the module docstring)."""
    spec, config = record["spec"], record["spec"]["config"]
    reg, model = config["regularizer"], config["model"]
    hparams = record.get("hparams") or {}
    row = {
        "run_id": record["run_id"], "status": record["status"], "dataset": spec["dataset"],
        "activation": model["activation"], "hidden": "x".join(map(str, model["hidden"])),
        "regularizer": reg["kind"],
        "strength": hparams.get("strength", reg.get("strength")),
        "learning_rate": hparams.get("learning_rate", config["optimizer"]["learning_rate"]),
        "epochs": config["epochs"], "batch_size": config["batch_size"], "seed": spec["seed"],
        "data_fraction": spec["data_fraction"], "label_noise": spec["label_noise"],
        "input_noise": spec["input_noise"], "featurizer": spec.get("featurizer", "hashed"),
    }
    scalar = lambda v: ",".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731
    row.update({k: scalar(v) for k, v in reg.items() if k not in ("kind", "strength")})
    row.update({k: scalar(v) for k, v in model.items() if k not in ("hidden", "activation")})
    row.update(fail_step=record.get("fail_step"), diverge_step=record.get("diverge_step"),
               seconds=record.get("seconds"))
    for name, value in record["metrics"].items():
        if isinstance(value, list):
            row.update({f"{name}_{i}": v for i, v in enumerate(value)})
        elif isinstance(value, dict):
            row.update({f"{name}/{k}": v for k, v in value.items()})
        else:
            row[name] = value
    return row


def results_paths(paths) -> list[pathlib.Path]:
    """The files a reader is given: one path, several, or glob patterns (``results/part-*.jsonl``,
    as a job array's shards write them); a pattern that matches nothing, or a missing file, is
    refused."""
    import glob

    given = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not given:
        raise ValueError("no results file given")
    out = []
    for item in given:
        text = str(item)
        if not os.path.exists(text) and any(c in text for c in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise ValueError(f"results pattern {text} matches no file")
            out.extend(pathlib.Path(m) for m in matches)
        elif not os.path.exists(text):
            raise ValueError(f"results file {text} does not exist")
        else:
            out.append(pathlib.Path(text))
    return list(dict.fromkeys(p.resolve() for p in out))


#: What two rows of one run must agree on to be one row (the rest: time, machine, layout).
SAME_RUN_FIELDS = ("status", "metrics", "curves")


def load_records(paths) -> list[dict]:
    """The valid records of one or more results JSONL files as one table (bad lines reported and
    skipped; no file is changed).

    ``paths``: a path, a list of paths or glob patterns (:func:`results_paths`). A run found in
    two files is kept once when both rows agree on its status, metrics and curves; rows that
    disagree are refused with both files named (two shards that overlap, or two results of one run
    on different device layouts, cannot be one table in silence).
    """
    files = results_paths(paths)
    records, source = {}, {}
    for path in files:
        for run_id, row in ResultsFile(path).load().items():
            if run_id not in records:
                records[run_id], source[run_id] = row, path
                continue
            differ = [f for f in SAME_RUN_FIELDS if records[run_id].get(f) != row.get(f)]
            if differ:
                raise ValueError(f"run {run_id} is in {source[run_id]} and in {path} with different "
                                 f"{', '.join(differ)}: keep one of the two rows (the files overlap)")
    if not records:
        names = ", ".join(map(str, files))
        raise ValueError(f"results file{'s' if len(files) > 1 else ''} {names} hold{'' if len(files) > 1 else 's'} no valid run")
    return list(records.values())
