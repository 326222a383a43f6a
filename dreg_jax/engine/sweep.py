"""Resumable sweeps: one JSON-lines record per finished run, keyed by a hash of its config.

* A run is a :class:`RunSpec` (dataset, full :class:`TrainConfig`, seed, data fraction, label
  noise, input noise). Its ``run_id`` is the SHA-256 of its canonical JSON (first 16 hex).
* Runs with the same structure (dataset + config with learning rate and strength blanked) form
  a group, trained in chunks by :func:`dreg_jax.engine.train_many` (one compiled program per
  group, vmapped over seeds, fractions, noise levels, learning rates and strengths).
* After each chunk its records are appended to the results file with one ``os.write`` and an
  ``fsync``. A SIGKILL can at worst leave a partial last line: on the next start it is cut off
  (that run is redone), finished runs are skipped, nothing is duplicated or lost. An exclusive
  ``flock`` keeps two sweeps from writing the same file at once.
* A run with a non-finite loss/gradient gets ``status: "failed"`` and ``fail_step``; the rest
  of the grid finishes.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import itertools
import json
import os
import pathlib
import time
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dreg_jax._checks import check_choice
from dreg_jax.data.registry import FEATURIZERS, check_dataset, load_dataset
from dreg_jax.engine.grid import compile_grid, prepare_inputs
from dreg_jax.engine.run import EngineData, EngineOptions, RunHParams
from dreg_jax.training.config import (
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
)
COMPILE_AHEAD = 1  # programs compiled in a background thread while one runs


@dataclasses.dataclass(frozen=True)
class RunSpec:
    dataset: str
    config: TrainConfig = TrainConfig()
    seed: int = 0
    data_fraction: float = 1.0
    label_noise: float = 0.0
    input_noise: float = 0.0
    featurizer: str = "hashed"  # text datasets: "hashed" n-grams or "minilm" (frozen encoder)

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
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        return self

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        c = d["config"]
        config = TrainConfig(
            model=ModelConfig(**{**c["model"], "hidden": tuple(c["model"]["hidden"])}),
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
        """What must be equal for runs to share one compiled program."""
        c = self.config
        blank = dataclasses.replace(
            c, optimizer=OptimizerConfig(), regularizer=dataclasses.replace(c.regularizer, strength=None)
        )
        return (self.dataset, self.featurizer), blank

    def hparams(self) -> RunHParams:
        return RunHParams(self.seed, self.config.optimizer.learning_rate,
                          self.config.regularizer.resolved_strength(), self.data_fraction,
                          self.label_noise, self.input_noise)


class ResultsFile:
    """Append-only JSON-lines results with crash repair; see the module docstring."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def load(self) -> dict:
        """``run_id -> record`` of every complete line (a partial last line is cut off)."""
        if not self.path.exists():
            return {}
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            cut = raw.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:  # drop the torn write; that run is redone
                f.truncate(cut)
            raw = raw[:cut]
        records = {}
        for number, line in enumerate(raw.decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}:{number} is not valid JSON ({err}); fix or remove that line") from err
            records.setdefault(record["run_id"], record)
        return records

    def append(self, records: Sequence[dict]):
        if not records:
            return
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def engine_data(name: str, featurizer: str = "hashed") -> tuple[EngineData, int]:
    ds = load_dataset(name, featurizer=featurizer)
    robust = (np.stack(list(ds.robust.values())) if ds.robust
              else np.zeros((0,) + ds.x_test.shape, np.float32))
    data = EngineData(jnp.asarray(ds.x_train), jnp.asarray(ds.y_train), jnp.asarray(ds.x_test),
                      jnp.asarray(ds.y_test), jnp.asarray(robust))
    return data, ds.num_classes


def _to_json(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


def _records(chunk, final, curves, seconds, robust_names):
    out = []
    for i, spec in enumerate(chunk):
        metrics = {k: _to_json(v[i]) for k, v in final.items()}
        if "robust_accuracy_per_set" in metrics:
            metrics["robust_accuracy_per_set"] = dict(zip(robust_names, metrics["robust_accuracy_per_set"]))
        fail_step = int(metrics.pop("fail_step"))
        out.append({
            "run_id": spec.run_id,
            "spec": spec.to_dict(),
            "status": "failed" if fail_step >= 0 else "ok",
            "fail_step": fail_step if fail_step >= 0 else None,
            "metrics": metrics,
            "curves": {k: _to_json(v[i]) for k, v in curves.items()},
            "seconds": seconds / len(chunk),
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        })
    return out


def run_sweep(specs: Iterable[RunSpec], results_path, *, chunk_size: int = 64,
              options: EngineOptions = EngineOptions(), mesh=None, progress: bool = True) -> list[dict]:
    """Runs every spec not yet in ``results_path``; returns the records of all ``specs``."""
    specs = [s.validate() for s in specs]  # every config checked before anything compiles
    unique = list({s.run_id: s for s in specs}.values())
    results = ResultsFile(results_path)
    results.path.parent.mkdir(parents=True, exist_ok=True)
    with open(results.path.with_name(results.path.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another sweep is writing {results.path}; wait for it or use another --results file") from None
        done = results.load()
        pending = [s for s in unique if s.run_id not in done]
        groups = collections.defaultdict(list)
        for s in pending:
            groups[s.structure()].append(s)
        chunks = []  # (dataset, featurizer, config, specs, padded size)
        for ((dataset, featurizer), config), members in groups.items():
            n_chunks = -(-len(members) // chunk_size)
            size = -(-len(members) // n_chunks)  # balanced chunks share one compiled program
            chunks += [(dataset, featurizer, config, members[i:i + size], size)
                       for i in range(0, len(members), size)]
        bar = tqdm(total=len(unique), initial=len(unique) - len(pending), desc="runs",
                   unit="run", disable=not progress)

        def prepared(item):
            dataset, featurizer, config, chunk, size = item
            data, num_classes = engine_data(dataset, featurizer)
            hp, data, _ = prepare_inputs(RunHParams.stack(s.hparams() for s in chunk), data, mesh, size)
            return hp, data, num_classes, compile_grid(config, num_classes, options, hp, data)

        # compile up to COMPILE_AHEAD programs in background threads while one runs
        with concurrent.futures.ThreadPoolExecutor(max_workers=COMPILE_AHEAD) as pool:
            futures = [pool.submit(prepared, item) for item in chunks[:COMPILE_AHEAD]]
            for i, item in enumerate(chunks):
                dataset, featurizer, config, chunk, _ = item
                bar.set_postfix_str(f"{dataset} {config.model.activation} {config.regularizer.kind}")
                t0 = time.perf_counter()
                hp, data, num_classes, program = futures[i].result()
                if i + COMPILE_AHEAD < len(chunks):
                    futures.append(pool.submit(prepared, chunks[i + COMPILE_AHEAD]))
                futures[i] = None  # let finished programs' inputs be freed
                final, curves = jax.tree_util.tree_map(
                    lambda a: np.asarray(a)[: len(chunk)], program(hp, data)
                )
                robust_names = list(load_dataset(dataset, featurizer=featurizer).robust)
                records = _records(chunk, final, curves, time.perf_counter() - t0, robust_names)
                results.append(records)
                done.update((r["run_id"], r) for r in records)
                bar.update(len(chunk))
        bar.close()
    return [done[s.run_id] for s in specs]


def summary_table(records: Sequence[dict]) -> str:
    """Mean +- std of test (and robust) accuracy per (dataset, activation, regularizer, fraction, noise)."""
    cells = collections.defaultdict(list)
    for r in records:
        s, c = r["spec"], r["spec"]["config"]
        key = (s["dataset"], c["model"]["activation"], c["regularizer"]["kind"],
               s["data_fraction"], s["label_noise"], s["input_noise"])
        cells[key].append(r)
    header = (f"{'dataset':<14}{'activation':<12}{'regularizer':<15}{'frac':>6}{'lnoise':>8}"
              f"{'inoise':>8}{'runs':>6}{'failed':>8}{'test acc %':>16}{'robust acc %':>16}")
    lines = [header, "-" * len(header)]
    for key in sorted(cells):
        rs = cells[key]
        ok = [r for r in rs if r["status"] == "ok"]
        acc = [100 * r["metrics"]["test_accuracy"] for r in ok]
        rob = [100 * r["metrics"]["robust_accuracy"] for r in ok if "robust_accuracy" in r["metrics"]]
        fmt = lambda v: f"{np.mean(v):6.2f} +- {np.std(v):5.2f}" if v else f"{'n/a':>15}"
        lines.append(f"{key[0]:<14}{key[1]:<12}{key[2]:<15}{key[3]:>6.2f}{key[4]:>8.2f}{key[5]:>8.2f}"
                     f"{len(rs):>6}{len(rs) - len(ok):>8}{fmt(acc):>16}{fmt(rob):>16}")
    return "\n".join(lines)


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
    dreg_scope: str = "activation"
    featurizer: str = "hashed"  # text datasets: "hashed" or "minilm"
    strength_schedules: tuple[str, ...] = ("constant",)  # DREG runs only; see penalties.schedules

    @classmethod
    def from_mapping(cls, mapping: dict) -> "SweepConfig":
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - valid)
        if unknown:
            raise ValueError(f"unknown sweep key(s) {unknown}; valid keys: {', '.join(sorted(valid))}")
        listy = {k: tuple(v) if isinstance(v, list) else v for k, v in mapping.items()}
        return cls(**listy)

    def expand(self) -> list[RunSpec]:
        for kind in self.strengths:
            if kind not in REGULARIZERS:
                raise ValueError(f"strengths has unknown regularizer {kind!r}; expected one of: {', '.join(REGULARIZERS)}")
        if set(self.strength_schedules) != {"constant"} and "dreg" not in self.regularizers:
            raise ValueError(f"strength_schedules {list(self.strength_schedules)} apply to the dreg regularizer "
                             f"only; add dreg to regularizers (got {list(self.regularizers)})")
        seeds = range(self.seeds) if isinstance(self.seeds, int) else self.seeds
        specs = []
        for ds, act, reg, lr in itertools.product(self.datasets, self.activations, self.regularizers,
                                                  self.learning_rates):
            strengths = self.strengths.get(reg, None)
            strengths = strengths if isinstance(strengths, (list, tuple)) else [strengths]
            schedules = self.strength_schedules if reg == "dreg" else ("constant",)
            for strength, schedule, seed, frac, ln, inoise in itertools.product(
                strengths, schedules, seeds, self.fractions, self.label_noise, self.input_noise
            ):
                config = TrainConfig(
                    model=ModelConfig(hidden=tuple(self.hidden), activation=act),
                    regularizer=RegularizerConfig(kind=reg, strength=strength, dreg_scope=self.dreg_scope,
                                                  strength_schedule=schedule),
                    optimizer=OptimizerConfig(learning_rate=lr),
                    epochs=self.epochs, batch_size=self.batch_size,
                )
                specs.append(RunSpec(ds, config, int(seed), float(frac), float(ln), float(inoise), self.featurizer))
        return [s.validate() for s in specs]
