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
import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dreg_jax._checks import check_choice
from dreg_jax._files import fault
from dreg_jax.data.registry import load_dataset
from dreg_jax.engine.distributed import broadcast_json, check_agreement, spans_processes
from dreg_jax.engine.grid import (
    PROCESS_STATS, CompileStats, block_width, compile_grid, enable_compilation_cache, fetch, place, run_blocks,
)
from dreg_jax.engine.buckets import Bucket, pad_engine_data, padding_rules
from dreg_jax.engine.grouping import BUCKET_MODES, FOLD_MODES, fold_config, forward_flops, plan_buckets, plan_folds
from dreg_jax.engine.run import EngineData, EngineOptions, RunHParams
from dreg_jax.engine.specs import RESULTS_VERSION, RunSpec  # noqa: F401 (re-exported)
from dreg_jax.engine.store import (  # noqa: F401 (re-exported)
    STATUSES, NotAResultsFile, ResultsFile, flat_row, record_problem, utc_now,
)
from dreg_jax.engine.sweep_config import SweepConfig  # noqa: F401 (re-exported)
from dreg_jax.training.regularizers import KIND_CURVES, get_regularizer
from dreg_jax.training.config import Fold, TrainConfig
from dreg_jax.training.tasks import SCORE_DISPLAY, score_name

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


def _records(chunk, final, curves, seconds, robust_names, layout):
    out = []
    for i, spec in enumerate(chunk):
        metrics = {k: _to_json(v[i]) for k, v in final.items()}
        per_set = f"robust_{score_name(spec.config.task)}_per_set"
        if per_set in metrics:  # a padded program's padding sets are left out
            metrics[per_set] = dict(zip(robust_names, metrics[per_set]))
        fail_step, diverge_step = int(metrics.pop("fail_step")), int(metrics.pop("diverge_step"))
        out.append({
            "run_id": spec.run_id,
            "spec": spec.to_dict(),
            "hparams": {k: _to_json(v) for k, v in spec.hparams()._asdict().items()
                        if k not in ("activation_index", "regularizer_index", "epochs")},
            "status": _status(fail_step, diverge_step),
            "fail_step": fail_step if fail_step >= 0 else None,
            "diverge_step": diverge_step if diverge_step >= 0 else None,
            "metrics": metrics,
            # the program's curves run to its epoch cap: the run's own epochs are the first ones
            "curves": {k: _to_json(v[i][:spec.config.epochs]) for k, v in curves.items()
                       if k not in KIND_CURVES or k in get_regularizer(spec.config.regularizer.kind).curves},
            "seconds": seconds / len(chunk),
            # devices, processes and vmap width: a run's last bits depend on them
            "layout": layout,
            "finished_at": utc_now(),
        })
    return out


def compile_workers() -> int:
    """Threads compiling programs while one runs: the cores left over by the running program
    (on a CPU it uses the cores too; on an accelerator host they are free). Measured on the
    2-core CPU with the v3 quick profile: one compile thread per core made the cold study slower
    (225 s against 209 s: the compiles and the runs contend for the cores)."""
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if jax.default_backend() == "cpu" else max(1, cores)


class Program(NamedTuple):
    """One compiled program of a sweep and the runs it trains, per dataset.

    ``config`` is the program config (folded choices, ``epochs`` the largest run's: the static
    cap, each run trains its own ``RunHParams.epochs``); ``bucket`` the padded shapes its
    datasets share (:mod:`dreg_jax.engine.buckets`), None for one dataset at its own shapes;
    ``runs`` ``((source, [spec, ...]), ...)`` in the sweep's order."""

    config: TrainConfig
    num_classes: int
    bucket: Bucket | None
    runs: tuple

    @property
    def specs(self) -> list:
        return [s for _, runs in self.runs for s in runs]


def _program_structure(spec: RunSpec) -> TrainConfig:
    """What runs of one program share: the structure without the dataset and the epochs."""
    return dataclasses.replace(spec.structure()[1], epochs=1)


def plan_programs(specs: Sequence[RunSpec], options: EngineOptions = EngineOptions(), backend: str | None = None,
                  plan_for: Sequence[RunSpec] = ()) -> list[Program]:
    """The compiled programs of a sweep and their runs (:class:`Program`).

    Runs of one structure (:meth:`RunSpec.structure` without dataset and epochs) are split into
    programs by the grouping cost model (:func:`dreg_jax.engine.grouping.plan_folds`,
    ``options.fold``), and each program's datasets into shape buckets
    (:func:`dreg_jax.engine.grouping.plan_buckets`, ``options.shape_buckets``); runs of
    different lengths share a program (the longest sets its cap). ``backend`` (default: JAX's)
    selects the cost model's constants. ``plan_for``: more runs to plan the programs for (a
    study that adds runs in rounds passes them all, so every round gets the same programs);
    only the programs of ``specs`` are returned.
    """
    check_choice("shape_buckets", options.shape_buckets, BUCKET_MODES)
    wanted = {s.run_id for s in specs}
    universe = list({s.run_id: s for s in [*specs, *plan_for]}.values())
    groups = collections.defaultdict(list)
    for s in universe:
        groups[_program_structure(s)].append(s)
    datasets = {}

    def dataset(source):
        if source not in datasets:
            datasets[source] = load_dataset(source[0], featurizer=source[1], validation_fraction=source[2])
        return datasets[source]

    def steps_of(spec):
        ds = dataset(spec.structure()[0])
        return spec.config.epochs * math.ceil(len(ds.x_train) / spec.config.batch_size)

    programs = []
    for config, members in groups.items():
        counts = collections.Counter((s.config.model.activation, s.config.regularizer.kind) for s in members)
        steps = round(sum(steps_of(s) for s in members) / len(members))
        flops = None
        first = members[0]
        if options.fold == "auto":
            ds = dataset(first.structure()[0])
            flops = forward_flops(fold_config(first.config, Fold((first.config.model.activation,),
                                                                 (first.config.regularizer.kind,))),
                                  ds.x_train.shape[1], ds.num_classes)
        for fold in plan_folds(config, counts, steps, options.fold, backend, flops, options.fold_activations):
            runs = [s for s in members if s.config.model.activation in fold.activations
                    and s.config.regularizer.kind in fold.regularizers]
            program_config = fold_config(dataclasses.replace(config, epochs=max(s.config.epochs for s in runs)), fold)
            by_source = collections.defaultdict(list)
            for s in runs:
                by_source[s.structure()[0]].append(s)
            shapes = {src: _shape_of(dataset(src)) for src in by_source}
            work = {src: (sum(steps_of(s) for s in rs), sum(s.config.epochs for s in rs),
                          sum(s.config.epochs for s in rs) * (shapes[src].test_rows + shapes[src].val_rows))
                    for src, rs in by_source.items()}
            rules = padding_rules(program_config, options.return_variables)
            for bucket, sources in plan_buckets(program_config, shapes, work, rules, options.shape_buckets, backend):
                pending = tuple((src, [s for s in by_source[src] if s.run_id in wanted]) for src in sources)
                pending = tuple((src, rs) for src, rs in pending if rs)
                if pending:
                    classes = bucket.classes if bucket is not None else dataset(sources[0]).num_classes
                    programs.append(Program(program_config, classes, bucket, pending))
    return programs


def _shape_of(ds) -> Bucket:
    n_val = 0 if ds.x_val is None else len(ds.x_val)
    return Bucket(len(ds.x_train), len(ds.x_test), n_val, ds.x_train.shape[1], ds.num_classes, len(ds.robust))


def program_data(program: Program, source) -> EngineData:
    """The engine's arrays of one of the program's datasets, padded to its bucket."""
    data, num_classes = engine_data(*source)
    return data if program.bucket is None else pad_engine_data(data, num_classes, program.bucket)


def shard_specs(specs: Sequence[RunSpec], index: int, count: int) -> list[RunSpec]:
    """Share ``index`` of ``count`` of a grid: the runs whose run id (hex) is ``index`` modulo
    ``count``. Deterministic, and a run keeps its share when the grid grows; every share of a
    program's runs compiles that program (shares trade compilations for independence)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= index < count")
    return [s for s in specs if int(s.run_id, 16) % count == index]


def run_sweep(specs: Iterable[RunSpec], results_path, *, chunk_size: int = 64,
              options: EngineOptions = EngineOptions(), mesh=None, progress: bool = True,
              stats: CompileStats | None = None, report: bool = True, plan_for: Sequence[RunSpec] = ()) -> list[dict]:
    """Runs every spec not yet in ``results_path``; returns the records of all ``specs``.

    ``chunk_size`` is the number of runs trained and written per results append (rounded to
    whole blocks of the vmap width, at least one); runs go in blocks of the vmap width (see :func:`dreg_jax.engine.grid.run_blocks`), so the
    results do not depend on it. Programs are compiled in a thread pool
    (:func:`compile_workers`) while earlier ones run, with the persistent compilation cache on
    (:func:`dreg_jax.engine.enable_compilation_cache`). Ends by printing
    ``compiled programs: N, compile seconds: S, run seconds: R`` (``report=False``: not
    printed; the figures are added to ``stats`` and to ``grid.PROCESS_STATS`` either way).
    ``plan_for``: runs to plan the compiled programs for besides the pending ones
    (:func:`plan_programs`): a study that calls this in rounds passes every run it will ask
    for, so the rounds share their programs.

    Several processes (``jax.distributed``, ``mesh=run_mesh()`` over every process's devices):
    process 0 alone reads ``results_path``, plans and writes; the others take its finished rows
    and pending runs (:mod:`dreg_jax.engine.distributed`) and return the same records. Every row
    records its ``layout`` (devices, processes, vmap width); a resume on another layout warns.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    specs = [s.validate() for s in specs]  # every config checked before anything compiles
    if not specs:
        raise ValueError("the sweep has no runs")
    check_choice("fold", options.fold, FOLD_MODES)
    if options.return_variables:
        raise ValueError("a sweep records metrics, not parameters: leave EngineOptions.return_variables "
                         "off (train_many returns them; dreg_jax.tune and `dreg-jax train --save-model` keep a model)")
    unique = list({s.run_id: s for s in specs}.values())
    distributed = spans_processes(mesh)
    if jax.process_count() > 1 and not distributed:
        raise ValueError(f"this is process {jax.process_index()} of {jax.process_count()} (jax.distributed) but the "
                         "mesh holds only this process's devices: pass mesh=run_mesh() (every process's devices) so "
                         "the processes share the grid and process 0 writes the results")
    writer = jax.process_index() == 0  # the only process that reads, plans from and writes the file
    results = ResultsFile(results_path)
    width = block_width(options, mesh)
    layout = {"devices": 1 if mesh is None else int(mesh.size), "processes": jax.process_count(),
              "vmap_width": width}
    stats = CompileStats() if stats is None else stats
    enable_compilation_cache()
    with contextlib.ExitStack() as held:
        done, problem = {}, None
        if writer:
            try:
                results.check_writable()  # a bad results path fails now, not after the first chunk
                held.enter_context(results.writer_lock())
                done = results.load(repair=True)
            except Exception as err:  # noqa: BLE001 - sent to the other processes, then raised here
                if not distributed:
                    raise
                problem = err
        if distributed:  # the others take process 0's view of the file: they never plan on their own
            shared = broadcast_json({"problem": None if problem is None else f"{type(problem).__name__}: {problem}",
                                     "done": {s.run_id: done[s.run_id] for s in unique if s.run_id in done}})
            if problem is not None:
                raise problem
            if shared["problem"] is not None:
                raise RuntimeError(f"process 0 cannot run the sweep: {shared['problem']}")
            if not writer:  # the writer's own rows are the ones it broadcast
                done = shared["done"]
        pending = [s for s in unique if s.run_id not in done]
        programs = plan_programs(pending, options, plan_for=plan_for)
        if distributed:
            check_agreement({"runs": [s.run_id for s in unique], "layout": layout,
                             "plan": [(repr(p.config), p.num_classes, p.bucket,
                                       [(src, [s.run_id for s in rs]) for src, rs in p.runs]) for p in programs]},
                            "runs or plans")
        if pending:
            _warn_other_layouts(done, layout)
        bar = tqdm(total=len(unique), initial=len(unique) - len(pending), desc="runs",
                   unit="run", disable=not progress or not writer)

        def prepared(program):
            blocks = []
            for source, runs in program.runs:
                data = program_data(program, source)
                hparams = RunHParams.stack([s.hparams(program.config) for s in runs])
                blocks.append([place(b, data, mesh) for b in run_blocks(hparams, width)])
            return blocks, compile_grid(program.config, program.num_classes, options, *blocks[0][0], stats=stats)

        workers = compile_workers()
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(prepared, item) for item in programs[:workers]]
            for i, program in enumerate(programs):
                config = program.config
                blocks_per_source, compiled = futures[i].result()
                if i + workers < len(programs):
                    futures.append(pool.submit(prepared, programs[i + workers]))
                futures[i] = None  # let finished programs' inputs be freed
                per_chunk = max(1, chunk_size // width)  # blocks per results append
                for (source, runs), blocks in zip(program.runs, blocks_per_source):
                    dataset, featurizer, _ = source
                    bar.set_postfix_str(f"{dataset} {'+'.join(config.activations)} {'+'.join(config.regularizers)}")
                    robust_names = list(load_dataset(dataset, featurizer=featurizer).robust)
                    for first in range(0, len(blocks), per_chunk):
                        chunk = runs[first * width:(first + per_chunk) * width]
                        t0 = time.perf_counter()
                        # every process fetches every block in the plan's order (a collective
                        # across processes), on this thread
                        outputs = [fetch(compiled(hp, data), mesh) for hp, data in blocks[first:first + per_chunk]]
                        seconds = time.perf_counter() - t0
                        stats.run_seconds += seconds
                        if stats is not PROCESS_STATS:
                            PROCESS_STATS.run_seconds += seconds
                        final, curves = jax.tree_util.tree_map(lambda *a: np.concatenate(a)[:len(chunk)], *outputs)
                        records = _records(chunk, final, curves, seconds, robust_names, layout)
                        if writer:
                            results.append(records)
                        done.update((r["run_id"], r) for r in records)
                        bar.update(len(chunk))
                        fault("sweep:chunk-done")  # the kill tests' hook (no-op unless set)
        bar.close()
    if report and writer:
        print(stats.line(), flush=True)
    return [done[s.run_id] for s in specs]


def _warn_other_layouts(done: dict, layout: dict):
    """Says when finished rows were trained on another device layout than this resume: a run's
    last bits depend on the device count and the vmap width (XLA vectorizes differently)."""
    others = collections.Counter(json.dumps(r["layout"], sort_keys=True) for r in done.values()
                                 if isinstance(r.get("layout"), dict) and r["layout"] != layout)
    if others:
        seen = "; ".join(f"{n} row(s) on {text}" for text, n in others.most_common())
        warnings.warn(f"resuming on layout {json.dumps(layout, sort_keys=True)}, but the file has {seen}: "
                      "rows of different layouts can differ in the last bits (float rounding), so a "
                      "bit-for-bit comparison across them will fail; pass the same --devices and "
                      "--vmap-width to keep one layout", stacklevel=3)


SUMMARY_KEYS = ("dataset", "activation", "regularizer", "data_fraction", "label_noise", "input_noise",
                "learning_rate", "strength", "hidden", "epochs", "batch_size", "dreg_scope",
                "strength_schedule", "featurizer")
_SHORT = {"data_fraction": "frac", "label_noise": "lnoise", "input_noise": "inoise", "learning_rate": "lr",
          "regularizer": "regularizer", "strength_schedule": "schedule", "batch_size": "batch"}


def summary_table(records: Sequence[dict]) -> str:
    """Mean +- std of validation (where the runs have a validation split), test and robust
    score (accuracy in percent, or a regression's :math:`R^2`) of the ok runs, grouped by dataset, activation, regularizer and every other config
    field that differs between the runs (learning rate, strength, fraction, noise, ...); failed
    and diverged runs are counted apart. Choose on the validation column, report the test one."""
    rows = [(flat_row(r), r) for r in records]
    always = ("dataset", "activation", "regularizer")
    keys = [k for k in SUMMARY_KEYS if k in always or len({str(f.get(k)) for f, _ in rows}) > 1]
    cells = collections.defaultdict(list)
    for flat, r in rows:
        cells[tuple(str(flat.get(k)) for k in keys)].append(r)
    widths = [max(len(_SHORT.get(k, k)), *(len(c[i]) for c in cells)) + 2 for i, k in enumerate(keys)]
    def score_of(r):
        return score_name(r["spec"]["config"].get("task", "classification"))

    scores = {score_of(r) for _, r in rows}
    short = {"accuracy": "acc %", "r2": "R^2"}
    label = short[scores.pop()] if len(scores) == 1 else "acc % / R^2"
    scale = lambda score: SCORE_DISPLAY[score][1]  # noqa: E731
    with_val = any(r["metrics"].get(f"validation_{score_of(r)}") is not None for _, r in rows)
    digits = 2 if label == "acc %" else 4
    col = 16 if digits == 2 else 20
    header = ("".join(f"{_SHORT.get(k, k):<{w}}" for k, w in zip(keys, widths))
              + f"{'runs':>6}{'failed':>8}{'diverged':>9}" + (f"{'val ' + label:>{col}}" if with_val else "")
              + f"{'test ' + label:>{col}}{'robust ' + label:>{col}}")
    lines = [header, "-" * len(header)]
    for cell in sorted(cells):
        rs = cells[cell]
        ok = [r for r in rs if r["status"] == "ok"]
        failed = sum(r["status"] == "failed" for r in rs)
        diverged = sum(r["status"] == "diverged" for r in rs)
        def values(split):
            return [scale(score_of(r)) * r["metrics"][f"{split}_{score_of(r)}"] for r in ok
                    if r["metrics"].get(f"{split}_{score_of(r)}") is not None]

        acc, val, rob = values("test"), values("validation"), values("robust")
        fmt = lambda v: (f"{np.mean(v):{digits + 4}.{digits}f} +- {np.std(v):{digits + 3}.{digits}f}"  # noqa: E731
                         if v else f"{'n/a':>15}")
        lines.append("".join(f"{c:<{w}}" for c, w in zip(cell, widths))
                     + f"{len(rs):>6}{failed:>8}{diverged:>9}" + (f"{fmt(val):>{col}}" if with_val else "")
                     + f"{fmt(acc):>{col}}{fmt(rob):>{col}}")
    return "\n".join(lines)
