"""Resumable sweeps: one JSON-lines record per finished run, keyed by a hash of its config.

* A run is a :class:`RunSpec` (dataset, full :class:`TrainConfig`, seed, data fraction, label
  noise, input noise). Its ``run_id`` is the SHA-256 of its canonical JSON (first 16 hex).
* Runs with the same structure (dataset + config with learning rate and strength blanked) form
  a group, trained in chunks by :func:`dreg_jax.engine.train_many` (one compiled program per
  group, vmapped over seeds, fractions, noise levels, learning rates and strengths).
* After each chunk its records are appended to the results file with one ``os.write`` and an
  ``fsync``. A SIGKILL can at worst leave a partial last line: on the next start it is set
  aside (that run is redone); a complete last row that only lacks its newline is kept; finished
  runs are skipped, nothing is duplicated or lost. An exclusive
  ``flock`` keeps two sweeps from writing the same file at once.
* A run with a non-finite loss/gradient gets ``status: "failed"`` and ``fail_step``; one whose
  data loss explodes gets ``status: "diverged"`` and ``diverge_step`` (criterion in
  :mod:`dreg_jax.engine.run`); the rest of the grid finishes.
* Rows are strict JSON (non-finite values are ``null``). On load every row is validated; a line
  that is not a valid row is reported with file and line and skipped. Only the writer (a sweep
  about to append) moves such lines to ``<file>.rejected``; readers (``dreg-jax results``,
  ``plot``, :func:`load_records`) never change a file. A file with lines but no valid row (a
  CSV passed by mistake) is refused untouched. Rows written by a newer version (spec fields this
  version does not know) are kept as they are. Paths are resolved: writes and the lock go to a
  symlink's target, so two names for one file share one lock.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import difflib
import fcntl
import functools
import hashlib
import itertools
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dreg_jax._checks import check_choice
from dreg_jax.data.registry import FEATURIZERS, USER_DATASETS, check_dataset, load_dataset
from dreg_jax.engine.grid import PROCESS_STATS, CompileStats, block_width, compile_grid, enable_compilation_cache, place, run_blocks
from dreg_jax.engine.identity import model_identity
from dreg_jax.engine.grouping import FOLD_MODES, fold_config, forward_flops, plan_folds
from dreg_jax.engine.run import EngineData, EngineOptions, RunHParams
from dreg_jax.training.regularizers import KIND_CURVES, get_regularizer
from dreg_jax.training.config import (
    CUSTOM_ACTIVATION,
    Fold,
    REGULARIZERS,
    ModelConfig,
    OptimizerConfig,
    RegularizerConfig,
    TrainConfig,
)

RESULTS_VERSION = 1
#: Config fields added after RESULTS_VERSION 1, left out of the run_id hash while they hold
#: these defaults, so results written before a field existed are still found on resume.
_LATER_DEFAULTS = (  # (path to the mapping, field, default)
    (("config", "regularizer"), "strength_schedule", "constant"),
    (("config", "regularizer"), "warmup_fraction", 0.25),
    (("config", "regularizer"), "noise_representation", "penultimate"),
    ((), "featurizer", "hashed"),
    ((), "validation_fraction", 0.0),
    (("config", "model"), "module", None),
    (("config", "model"), "jacobian_layers", []),
    (("config",), "fold", None),  # set only on programs, never on a run's own config
    (("config", "regularizer"), "weight_decay_reading", "times_lr"),
    (("config", "regularizer"), "spectral_norm_head", True),
    (("config", "regularizer"), "dreg_output_layer", False),
)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    dataset: str
    config: TrainConfig = TrainConfig()
    seed: int = 0
    data_fraction: float = 1.0
    label_noise: float = 0.0
    input_noise: float = 0.0
    featurizer: str = "hashed"  # text datasets: "hashed" n-grams or "minilm" (frozen encoder)
    validation_fraction: float = 0.0  # built-in sets: training share held out for validation

    def validate(self) -> "RunSpec":
        check_dataset(self.dataset)
        self.config.validate()
        if not 0.0 < self.data_fraction <= 1.0:
            raise ValueError(f"data_fraction must be in (0, 1], got {self.data_fraction}")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        if self.input_noise < 0.0:
            raise ValueError(f"input_noise must be >= 0, got {self.input_noise}")
        check_choice("featurizer", self.featurizer, FEATURIZERS)
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.validation_fraction and self.dataset in USER_DATASETS:
            raise ValueError(f"{self.dataset!r} is your own dataset: its validation split comes from "
                             "from_arrays/from_csv; leave validation_fraction at 0")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        return self

    def to_dict(self) -> dict:
        """Plain JSON values; a user module is recorded as ``"<Class>@<fingerprint>"`` of what it
        computes (:mod:`dreg_jax.engine.identity`), so an edit to its code changes the run id."""
        spec = self
        module = self.config.model.module
        if module is not None and not isinstance(module, str):
            model = dataclasses.replace(self.config.model, module=model_identity(module))
            spec = dataclasses.replace(self, config=dataclasses.replace(self.config, model=model))
        return json.loads(json.dumps(dataclasses.asdict(spec)))

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        c = d["config"]
        config = TrainConfig(
            model=ModelConfig(**{**c["model"], "hidden": tuple(c["model"]["hidden"]),
                                 "jacobian_layers": tuple(c["model"].get("jacobian_layers", ()))}),
            regularizer=RegularizerConfig(**c["regularizer"]),
            optimizer=OptimizerConfig(**c["optimizer"]),
            epochs=c["epochs"], batch_size=c["batch_size"],
        )
        return cls(**{**d, "config": config})

    @property
    def run_id(self) -> str:
        d = self.to_dict()
        for path, name, default in _LATER_DEFAULTS:
            fields = functools.reduce(lambda m, k: m[k], path, d)
            if fields.get(name) == default:
                del fields[name]
        canonical = json.dumps({"v": RESULTS_VERSION, **d}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def structure(self):
        """What must be equal for runs to be able to share one compiled program: everything
        but the numbers (traced per run) and the activation and regularizer kind (folded
        where the grouping cost model says so, :mod:`dreg_jax.engine.grouping`)."""
        c = self.config
        blank = dataclasses.replace(
            c, optimizer=OptimizerConfig(), model=dataclasses.replace(c.model, activation=""),
            regularizer=dataclasses.replace(c.regularizer, strength=None, kind=""),
        )
        return (self.dataset, self.featurizer, self.validation_fraction), blank

    def hparams(self, program: TrainConfig | None = None) -> RunHParams:
        """The run's traced values; ``program`` (a folded config) sets its fold indices."""
        program = program or self.config
        return RunHParams(seed=self.seed, learning_rate=self.config.optimizer.learning_rate,
                          strength=self.config.regularizer.resolved_strength(),
                          data_fraction=self.data_fraction, label_noise=self.label_noise,
                          input_noise=self.input_noise,
                          activation_index=program.activations.index(self.config.model.activation),
                          regularizer_index=program.regularizers.index(self.config.regularizer.kind))


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
    if record["status"] == "ok" and "test_accuracy" not in record["metrics"]:
        return "ok row has no metrics.test_accuracy"
    if _newer_fields(record["spec"]):
        return None  # a row from a newer version: its id cannot be recomputed here; kept as is
    try:
        run_id = RunSpec.from_dict(record["spec"]).run_id
    except (KeyError, TypeError, ValueError) as err:
        return f"row spec cannot be read ({type(err).__name__}: {err})"
    if run_id != record["run_id"]:
        return f"row spec hashes to {run_id}, not its run_id {record['run_id']}"
    return None


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
        numbered = [(n, line, True) for n, line in enumerate(lines, 1)]
        if unterminated.strip():
            numbered.append((len(lines) + 1, unterminated, False))
        for number, line, terminated in numbered:
            if not line.strip():
                kept.append(line)
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
            kept.append(line)
            if record["run_id"] in records:
                continue  # a duplicate of a run already loaded: harmless, left in place
            records[record["run_id"]] = record
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

    def _set_aside(self, rejected):
        with open(self.rejected_path, "a", encoding="utf-8") as f:
            for number, line, problem in rejected:
                f.write(json.dumps({"file": str(self.path), "line": number, "reason": problem,
                                    "text": line.decode("utf-8", errors="backslashreplace"),
                                    "set_aside_at": _now()}) + "\n")
        for number, _, problem in rejected:
            self.log(f"{self.path}:{number}: {problem}; moved to {self.rejected_path} "
                     "(the run is redone if this sweep contains it)")

    def _rewrite(self, lines):
        tmp = self.real_path.with_name(self.real_path.name + ".tmp")
        data = b"".join(line + b"\n" for line in lines if line.strip())
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.real_path)

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


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def engine_data(name: str, featurizer: str = "hashed", validation_fraction: float = 0.0) -> tuple[EngineData, int]:
    ds = load_dataset(name, featurizer=featurizer, validation_fraction=validation_fraction)
    return dataset_engine_data(ds), ds.num_classes


def dataset_engine_data(ds) -> EngineData:
    """The engine's arrays of a :class:`dreg_jax.data.Dataset` (built-in or your own)."""
    robust = (np.stack(list(ds.robust.values())) if ds.robust
              else np.zeros((0,) + ds.x_test.shape, np.float32))
    has_val = ds.x_val is not None and len(ds.x_val) > 0
    return EngineData(jnp.asarray(ds.x_train), jnp.asarray(ds.y_train), jnp.asarray(ds.x_test),
                      jnp.asarray(ds.y_test), jnp.asarray(robust),
                      jnp.asarray(ds.x_val) if has_val else None,
                      jnp.asarray(ds.y_val) if has_val else None)


def _to_json(value):
    """Plain JSON values; non-finite floats become null (strict JSON has no NaN)."""
    value = np.asarray(value)
    return _finite_or_none(value.item() if value.ndim == 0 else value.tolist())


def _finite_or_none(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _status(fail_step: int, diverge_step: int) -> str:
    return "failed" if fail_step >= 0 else "diverged" if diverge_step >= 0 else "ok"


def _records(chunk, final, curves, seconds, robust_names):
    out = []
    for i, spec in enumerate(chunk):
        metrics = {k: _to_json(v[i]) for k, v in final.items()}
        if "robust_accuracy_per_set" in metrics:
            metrics["robust_accuracy_per_set"] = dict(zip(robust_names, metrics["robust_accuracy_per_set"]))
        fail_step, diverge_step = int(metrics.pop("fail_step")), int(metrics.pop("diverge_step"))
        out.append({
            "run_id": spec.run_id,
            "spec": spec.to_dict(),
            "hparams": {k: _to_json(v) for k, v in spec.hparams()._asdict().items()
                        if k not in ("activation_index", "regularizer_index")},
            "status": _status(fail_step, diverge_step),
            "fail_step": fail_step if fail_step >= 0 else None,
            "diverge_step": diverge_step if diverge_step >= 0 else None,
            "metrics": metrics,
            "curves": {k: _to_json(v[i]) for k, v in curves.items()
                       if k not in KIND_CURVES or k in get_regularizer(spec.config.regularizer.kind).curves},
            "seconds": seconds / len(chunk),
            "finished_at": _now(),
        })
    return out


def compile_workers() -> int:
    """Threads compiling programs while one runs: the cores left over by the running program
    (on a CPU it uses the cores too; on an accelerator host they are free)."""
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if jax.default_backend() == "cpu" else max(1, cores)


def plan_programs(specs: Sequence[RunSpec], options: EngineOptions = EngineOptions(), backend: str | None = None):
    """``[(source, program_config, [spec, ...])]``: the compiled programs of a sweep and their runs.

    Runs of one structure (:meth:`RunSpec.structure`) are split into programs by the grouping
    cost model (:func:`dreg_jax.engine.grouping.plan_folds`, ``options.fold``); a program's runs
    keep the sweep's order. ``backend`` (default: JAX's) selects the cost model's constants.
    """
    groups = collections.defaultdict(list)
    for s in specs:
        groups[s.structure()].append(s)
    programs = []
    for (source, config), members in groups.items():
        counts = collections.Counter((s.config.model.activation, s.config.regularizer.kind) for s in members)
        ds = load_dataset(source[0], featurizer=source[1], validation_fraction=source[2])
        steps = config.epochs * math.ceil(len(ds.x_train) / config.batch_size)
        flops = None
        if options.fold == "auto":
            first = members[0].config
            flops = forward_flops(fold_config(config, Fold((first.model.activation,), (first.regularizer.kind,))),
                                  ds.x_train.shape[1], ds.num_classes)
        for fold in plan_folds(config, counts, steps, options.fold, backend, flops):
            runs = [s for s in members if s.config.model.activation in fold.activations
                    and s.config.regularizer.kind in fold.regularizers]
            programs.append((source, fold_config(config, fold), runs))
    return programs


def run_sweep(specs: Iterable[RunSpec], results_path, *, chunk_size: int = 64,
              options: EngineOptions = EngineOptions(), mesh=None, progress: bool = True,
              stats: CompileStats | None = None, report: bool = True) -> list[dict]:
    """Runs every spec not yet in ``results_path``; returns the records of all ``specs``.

    ``chunk_size`` is the number of runs trained and written per results append (rounded to
    whole blocks of the vmap width, at least one); runs go in blocks of the vmap width (see :func:`dreg_jax.engine.grid.run_blocks`), so the
    results do not depend on it. Programs are compiled in a thread pool
    (:func:`compile_workers`) while earlier ones run, with the persistent compilation cache on
    (:func:`dreg_jax.engine.enable_compilation_cache`). Ends by printing
    ``compiled programs: N, compile seconds: S, run seconds: R`` (``report=False``: not
    printed; the figures are added to ``stats`` and to ``grid.PROCESS_STATS`` either way).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    specs = [s.validate() for s in specs]  # every config checked before anything compiles
    if not specs:
        raise ValueError("the sweep has no runs")
    check_choice("fold", options.fold, FOLD_MODES)
    unique = list({s.run_id: s for s in specs}.values())
    results = ResultsFile(results_path)
    results.check_writable()  # a bad results path fails now, not after the first chunk
    width = block_width(options, mesh)
    stats = CompileStats() if stats is None else stats
    enable_compilation_cache()
    with open(results.lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another sweep is writing {results.real_path}; wait for it or use another --results file") from None
        done = results.load(repair=True)
        pending = [s for s in unique if s.run_id not in done]
        programs = plan_programs(pending, options)
        bar = tqdm(total=len(unique), initial=len(unique) - len(pending), desc="runs",
                   unit="run", disable=not progress)

        def prepared(item):
            source, config, runs = item
            data, num_classes = engine_data(*source)
            hparams = [s.hparams(config) for s in runs]
            blocks = [place(b, data, mesh) for b in run_blocks(RunHParams.stack(hparams), width)]
            return blocks, compile_grid(config, num_classes, options, *blocks[0], stats=stats)

        workers = compile_workers()
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(prepared, item) for item in programs[:workers]]
            for i, (source, config, runs) in enumerate(programs):
                dataset, featurizer, _ = source
                bar.set_postfix_str(f"{dataset} {'+'.join(config.activations)} {'+'.join(config.regularizers)}")
                blocks, program = futures[i].result()
                if i + workers < len(programs):
                    futures.append(pool.submit(prepared, programs[i + workers]))
                futures[i] = None  # let finished programs' inputs be freed
                robust_names = list(load_dataset(dataset, featurizer=featurizer).robust)
                per_chunk = max(1, chunk_size // width)  # blocks per results append
                for first in range(0, len(blocks), per_chunk):
                    chunk = runs[first * width:(first + per_chunk) * width]
                    t0 = time.perf_counter()
                    outputs = [jax.tree_util.tree_map(np.asarray, program(hp, data))
                               for hp, data in blocks[first:first + per_chunk]]
                    seconds = time.perf_counter() - t0
                    stats.run_seconds += seconds
                    if stats is not PROCESS_STATS:
                        PROCESS_STATS.run_seconds += seconds
                    final, curves = jax.tree_util.tree_map(lambda *a: np.concatenate(a)[:len(chunk)], *outputs)
                    records = _records(chunk, final, curves, seconds, robust_names)
                    results.append(records)
                    done.update((r["run_id"], r) for r in records)
                    bar.update(len(chunk))
        bar.close()
    if report:
        print(stats.line(), flush=True)
    return [done[s.run_id] for s in specs]


SUMMARY_KEYS = ("dataset", "activation", "regularizer", "data_fraction", "label_noise", "input_noise",
                "learning_rate", "strength", "hidden", "epochs", "batch_size", "dreg_scope",
                "strength_schedule", "featurizer")
_SHORT = {"data_fraction": "frac", "label_noise": "lnoise", "input_noise": "inoise", "learning_rate": "lr",
          "regularizer": "regularizer", "strength_schedule": "schedule", "batch_size": "batch"}


def summary_table(records: Sequence[dict]) -> str:
    """Mean +- std of test (and robust) accuracy of the ok runs, grouped by dataset, activation,
    regularizer and every other config field that differs between the runs (learning rate,
    strength, fraction, noise, ...); failed and diverged runs are counted apart."""
    from dreg_jax.analysis.results import flat_row

    rows = [(flat_row(r), r) for r in records]
    always = ("dataset", "activation", "regularizer")
    keys = [k for k in SUMMARY_KEYS if k in always or len({str(f.get(k)) for f, _ in rows}) > 1]
    cells = collections.defaultdict(list)
    for flat, r in rows:
        cells[tuple(str(flat.get(k)) for k in keys)].append(r)
    widths = [max(len(_SHORT.get(k, k)), *(len(c[i]) for c in cells)) + 2 for i, k in enumerate(keys)]
    header = ("".join(f"{_SHORT.get(k, k):<{w}}" for k, w in zip(keys, widths))
              + f"{'runs':>6}{'failed':>8}{'diverged':>9}{'test acc %':>16}{'robust acc %':>16}")
    lines = [header, "-" * len(header)]
    for cell in sorted(cells):
        rs = cells[cell]
        ok = [r for r in rs if r["status"] == "ok"]
        failed = sum(r["status"] == "failed" for r in rs)
        diverged = sum(r["status"] == "diverged" for r in rs)
        acc = [100 * r["metrics"]["test_accuracy"] for r in ok]
        rob = [100 * r["metrics"]["robust_accuracy"] for r in ok if r["metrics"].get("robust_accuracy") is not None]
        fmt = lambda v: f"{np.mean(v):6.2f} +- {np.std(v):5.2f}" if v else f"{'n/a':>15}"  # noqa: E731
        lines.append("".join(f"{c:<{w}}" for c, w in zip(cell, widths))
                     + f"{len(rs):>6}{failed:>8}{diverged:>9}{fmt(acc):>16}{fmt(rob):>16}")
    return "\n".join(lines)


_NAME_LISTS = ("datasets", "activations", "regularizers", "strength_schedules", "dreg_scope")
_NUMBER_LISTS = ("fractions", "label_noise", "input_noise", "learning_rates")
_POSITIVE_INTS = ("epochs", "batch_size")
_NAMES = ("featurizer",)
_FRACTIONS = ("validation_fraction",)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _coerce_field(key, value):
    """Checks a sweep key's value type (lists where lists are expected); returns it as a tuple."""
    as_list = list(value) if isinstance(value, (list, tuple)) else [value]
    if key in _NAME_LISTS:
        if not as_list or not all(isinstance(v, str) for v in as_list):
            raise ValueError(f"{key} must be a name or a list of names, got {value!r}")
        return tuple(as_list)
    if key in _NUMBER_LISTS:
        if not as_list or not all(_is_number(v) and math.isfinite(v) for v in as_list):
            raise ValueError(f"{key} must be a finite number or a list of them, got {value!r}")
        return tuple(float(v) for v in as_list)
    if key == "seeds":
        if _is_int(value) and value >= 1:
            return int(value)
        if isinstance(value, (list, tuple)) and value and all(_is_int(v) and 0 <= v < 2**32 for v in value):
            return tuple(int(v) for v in value)
        raise ValueError(f"seeds must be a positive count (0..n-1) or a list of integer seeds, got {value!r}")
    if key == "hidden":
        if not as_list or not all(_is_int(v) and v >= 1 for v in as_list):
            raise ValueError(f"hidden must be a list of positive integer widths, got {value!r}")
        return tuple(int(v) for v in as_list)
    if key in _POSITIVE_INTS:
        if not (_is_int(value) and value >= 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
        return int(value)
    if key in _FRACTIONS:
        if not (_is_number(value) and 0 <= value < 1):
            raise ValueError(f"{key} must be a number in [0, 1), got {value!r}")
        return float(value)
    if key in ("module", "jacobian_layers"):
        raise ValueError(f"{key} can only be given from Python (SweepConfig(module=..., jacobian_layers=...))")
    if key in _NAMES:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a name, got {value!r}")
        return value
    if key == "strengths":
        if not isinstance(value, dict):
            raise ValueError(f"strengths must map regularizer names to strengths, got {value!r}")
        out = {}
        for name, v in value.items():
            vs = list(v) if isinstance(v, (list, tuple)) else [v]
            if not vs or not all(_is_number(x) and math.isfinite(x) and x >= 0 for x in vs):
                raise ValueError(f"strengths[{name!r}] must be a finite number >= 0 or a list of them, got {v!r}")
            out[name] = [float(x) for x in vs] if isinstance(v, (list, tuple)) else float(v)
        return out
    if key in ("regularizer_options", "model_options"):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must map config fields to values, got {value!r}")
        return dict(value)
    return value


def _options(key: str, options: dict, config_class, fixed: set) -> dict:
    """``SweepConfig.regularizer_options`` / ``model_options`` checked against the config's fields."""
    valid = {f.name for f in dataclasses.fields(config_class)} - fixed
    for name in options:
        if name in fixed:
            raise ValueError(f"{key} cannot set {name!r}: the sweep's own key sets it")
        if name not in valid:
            hint = difflib.get_close_matches(name, valid, 1)
            raise ValueError(f"{key} has unknown field {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                             + f"; valid: {', '.join(sorted(valid))}")
    return dict(options)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A factorial grid, as written in a YAML/JSON sweep file (keys = field names)."""

    datasets: tuple[str, ...] = ("digits",)
    activations: tuple[str, ...] = ("gelu",)
    regularizers: tuple[str, ...] = ("none", "dreg")
    seeds: int | tuple[int, ...] = 3  # a count (0..n-1) or an explicit list
    fractions: tuple[float, ...] = (1.0,)
    label_noise: tuple[float, ...] = (0.0,)
    input_noise: tuple[float, ...] = (0.0,)
    learning_rates: tuple[float, ...] = (1e-3,)
    strengths: dict = dataclasses.field(default_factory=dict)  # regularizer -> strength (lists ok)
    hidden: tuple[int, ...] = (64, 64, 64)
    epochs: int = 20
    batch_size: int = 64
    # DREG's reading: "activation" or "layer", or a list of both: one DREG arm per scope (the
    # other regularizers' runs take the first)
    dreg_scope: str | tuple[str, ...] = "activation"
    # further RegularizerConfig fields for every run, e.g. {"layer_estimator": "exact",
    # "weight_decay_reading": "per_step", "spectral_norm_head": False}
    regularizer_options: dict = dataclasses.field(default_factory=dict)
    # further ModelConfig fields for every run, e.g. {"chainzrule_input_bound": None} (no clip)
    model_options: dict = dataclasses.field(default_factory=dict)
    featurizer: str = "hashed"  # text datasets: "hashed" or "minilm"
    validation_fraction: float = 0.0  # built-in sets: stratified training share held out (0: none)
    strength_schedules: tuple[str, ...] = ("constant",)  # DREG runs only; see penalties.schedules
    module: Any = None  # your own linen module (Python only; see ModelConfig.module)
    jacobian_layers: tuple[str, ...] = ()  # its submodules for dreg_scope="layer"

    @classmethod
    def from_mapping(cls, mapping: dict) -> "SweepConfig":
        """A config from a YAML/JSON mapping, every value type-checked (one-line errors)."""
        if not isinstance(mapping, dict):
            raise ValueError(f"a sweep config is a mapping of keys, got {type(mapping).__name__}")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - valid)
        if unknown:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, 1)) else repr(k)
                     for k in unknown]
            raise ValueError(f"unknown sweep key(s) {unknown}; valid keys: {', '.join(sorted(valid))}"
                             + (f"; {', '.join(h for h in hints if 'did you mean' in h)}" if any('did you mean' in h for h in hints) else ""))
        return cls(**{k: _coerce_field(k, v) for k, v in mapping.items()})

    def expand(self) -> list[RunSpec]:
        for kind in self.strengths:
            if kind not in REGULARIZERS:
                raise ValueError(f"strengths has unknown regularizer {kind!r}; expected one of: {', '.join(REGULARIZERS)}")
        if set(self.strength_schedules) != {"constant"} and not any(
                get_regularizer(r).schedulable for r in self.regularizers):
            raise ValueError(f"strength_schedules {list(self.strength_schedules)} apply to the dreg regularizer "
                             f"only; add dreg to regularizers (got {list(self.regularizers)})")
        seeds = range(self.seeds) if isinstance(self.seeds, int) else self.seeds
        activations = (CUSTOM_ACTIVATION,) if self.module is not None else self.activations
        scopes = (self.dreg_scope,) if isinstance(self.dreg_scope, str) else tuple(self.dreg_scope)
        if not scopes:
            raise ValueError("dreg_scope must name a scope (activation, layer) or a list of them")
        options = _options("regularizer_options", self.regularizer_options, RegularizerConfig,
                           {"kind", "strength", "dreg_scope", "strength_schedule"})
        model_options = _options("model_options", self.model_options, ModelConfig,
                                 {"hidden", "activation", "module", "jacobian_layers"})
        specs = []
        for ds, act, reg, lr in itertools.product(self.datasets, activations, self.regularizers,
                                                  self.learning_rates):
            strengths = self.strengths.get(reg, None)
            strengths = strengths if isinstance(strengths, (list, tuple)) else [strengths]
            schedulable = get_regularizer(reg).schedulable  # several readings and lambda_t schedules
            schedules = self.strength_schedules if schedulable else ("constant",)
            for scope, strength, schedule, seed, frac, ln, inoise in itertools.product(
                scopes if schedulable else scopes[:1], strengths, schedules, seeds, self.fractions,
                self.label_noise, self.input_noise
            ):
                config = TrainConfig(
                    model=ModelConfig(hidden=tuple(self.hidden), activation=act, module=self.module,
                                      jacobian_layers=tuple(self.jacobian_layers), **model_options),
                    regularizer=RegularizerConfig(kind=reg, strength=strength, dreg_scope=scope,
                                                  strength_schedule=schedule, **options),
                    optimizer=OptimizerConfig(learning_rate=lr),
                    epochs=self.epochs, batch_size=self.batch_size,
                )
                specs.append(RunSpec(ds, config, int(seed), float(frac), float(ln), float(inoise), self.featurizer,
                                     float(self.validation_fraction)))
        return [s.validate() for s in specs]
