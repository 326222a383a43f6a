"""The ``dreg-jax`` command line (``dreg-jax --help`` prints :data:`DESCRIPTION`)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import sys
import time
import warnings

from dreg_jax._files import (
    atomic_output,
    atomic_write,
    check_outputs,
    check_writable_directory,
    check_writable_file,
)


#: every subcommand and its one-line help: the top-level description's list and the
#: subcommands' help (the full parser and the light top-level one) are built from it
COMMANDS = {
    "train": "train one run and print its metrics (--out: a results row)",
    "sweep": "a resumable factorial grid of runs, one results row per run",
    "tune": "tune none, weight decay and your regularizers on validation rows, then compare them on held-out rows",
    "predict": "predict the rows of a CSV with a saved model (labels, or a regression's values)",
    "results": "summary table (and flat CSV) of results files",
    "plot": "accuracy (or R^2) and learning-curve plots of results files",
    "data": "list or inspect the datasets",
}


def _commands_block() -> str:
    import textwrap

    return "\n".join(textwrap.fill(text, width=88, initial_indent=f"  {name:<10}", subsequent_indent=" " * 12)
                     for name, text in COMMANDS.items())


DESCRIPTION = f"""\
dreg-jax: train, tune and study DREG-regularized networks (JAX/Flax).

commands:
{_commands_block()}

examples:
  dreg-jax train --dataset digits --activation chainzrule --regularizer dreg --epochs 20
  dreg-jax tune --csv table.csv --target label --save-model models/
  dreg-jax predict --model models/dreg --csv new_rows.csv --out predictions.csv
  dreg-jax sweep --datasets digits wine --regularizers none dreg --seeds 5 --results results/sweep.jsonl
  dreg-jax results results/sweep.jsonl
  dreg-jax data list

`dreg-jax COMMAND --help` lists a command's options and their defaults.
"""


def _json_number(value):
    """JSON for numpy scalars."""
    return float(value)



def _strict_yaml_loader():
    """PyYAML's safe loader, with two YAML 1.2 readings: ``1e-3`` is a number (YAML 1.1 makes it
    a string), and a key given twice in one mapping is an error (not a silent last-one-wins)."""
    import re

    import yaml

    class Strict(yaml.SafeLoader):
        pass

    Strict.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Strict


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"key(s) {twice} given twice")
    return dict(pairs)


#: Largest sweep config read (a config is a few lines; this bounds what a parser is handed).
MAX_CONFIG_BYTES = 2**20


def _refuse_yaml_aliases(text: str, path: pathlib.Path):
    """A sweep config never needs YAML anchors and aliases, and aliases nested in aliases expand
    exponentially (an "alias bomb"): refused before anything is built."""
    import yaml

    try:
        events = list(yaml.parse(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return  # malformed: the loader reports it with its line and column
    for event in events:
        if isinstance(event, yaml.AliasEvent):
            mark = event.start_mark
            raise ValueError(f"config file {path} uses a YAML alias (*{event.anchor}) at line {mark.line + 1}; "
                             "write the values out (a sweep config takes no anchors or aliases)")


def _load_mapping(path: pathlib.Path) -> dict:
    if not path.exists():
        raise ValueError(f"config file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"config file {path} holds {path.stat().st_size} bytes, more than the {MAX_CONFIG_BYTES} "
                         "a sweep config may (it lists a few keys)")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not UTF-8 text") from None
    yaml_file = path.suffix in (".yaml", ".yml")
    if yaml_file:
        _refuse_yaml_aliases(text, path)
    try:
        if yaml_file:
            import yaml

            mapping = yaml.load(text, Loader=_strict_yaml_loader())  # noqa: S506 - a SafeLoader subclass
        else:
            mapping = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ValueError(f"config file {path} nests too deeply to be a sweep config") from None
    except Exception as err:  # noqa: BLE001 - yaml.YAMLError / json.JSONDecodeError, one line
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        reason = getattr(err, "problem", None) or getattr(err, "msg", None) or str(err)
        raise ValueError(f"config file {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}{at}: {reason}") from None
    if mapping is None or mapping == {}:
        raise ValueError(f"config file {path} is empty; give at least one sweep key "
                         "(e.g. datasets: [digits])")
    if not isinstance(mapping, dict):
        raise ValueError(f"{path} must hold a mapping of sweep keys, got {type(mapping).__name__}")
    return mapping


CSV_ONLY_FLAGS = (("--target", "target"), ("--test-csv", "test_csv"), ("--drop", "drop"), ("--keep", "keep"),
                  ("--encoding", "encoding"), ("--split-seed", "split_seed"))


def _refuse_csv_flags_without_csv(args):
    """``--test-csv``, ``--drop``, ... describe a ``--csv`` table: without one they would be
    ignored in silence, so they are refused."""
    if getattr(args, "csv", None) is not None:
        return
    given = [flag for flag, name in CSV_ONLY_FLAGS if getattr(args, name, None) not in (None, (), [])]
    if given:
        raise ValueError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to your own table (--csv FILE); "
                         "this command uses a built-in dataset: add --csv FILE or leave "
                         f"{'them' if len(given) > 1 else 'it'} out")


def _inputs(args) -> dict:
    """The files a command reads (flag -> path), for :func:`dreg_jax._files.check_outputs`."""
    return {flag: getattr(args, name, None) for flag, name in (("--csv", "csv"), ("--test-csv", "test_csv"),
                                                               ("--config", "config"))}


def _sweep_config(args):
    from dreg_jax.engine import SweepConfig

    _refuse_csv_flags_without_csv(args)
    mapping = dict(_load_mapping(args.config)) if args.config else {}
    if getattr(args, "csv", None) is not None:  # your own data: checked, split, registered by name
        from dreg_jax.data import from_csv, register_dataset

        if not args.target:
            raise ValueError("--csv needs --target COLUMN (the label column)")
        # --validation-fraction is the CSV's own split here (default 0.1 of the training rows)
        fraction = getattr(args, "validation_fraction", None)
        task = getattr(args, "task", None) or mapping.get("task") or "classification"  # the flag, else --config's
        ds = from_csv(args.csv, args.target, test_csv=args.test_csv, task=task,
                      validation_fraction=0.1 if fraction is None else fraction,
                      seed=0 if args.split_seed is None else args.split_seed, drop=args.drop or (),
                      keep=args.keep or (), encoding=args.encoding or "utf-8-sig")
        args.validation_fraction = None  # taken by the split above, not by the sweep
        register_dataset(ds)
        target = (f"target {args.target} (mean {ds.preprocessing.target_mean:.4g}, deviation "
                  f"{ds.preprocessing.target_std:.4g}: learned standardized)" if ds.task == "regression"
                  else f"classes {list(ds.label_names)}")
        print(f"{ds.name}: {len(ds.x_train)} train / {len(ds.x_val)} validation / {len(ds.x_test)} test rows, "
              f"{ds.num_features} features, {target}")
        args.datasets = [ds.name]
    for field in ("datasets", "activations", "regularizers", "seeds", "fractions", "label_noise",
                  "input_noise", "learning_rates", "hidden", "epochs", "batch_size", "dreg_scope",
                  "strength_schedules", "featurizer", "validation_fraction", "class_weight", "task"):
        value = getattr(args, field, None)
        if value is not None:
            mapping[field] = value
    reading = getattr(args, "weight_decay_reading", None)
    if reading is not None:
        mapping["regularizer_options"] = {**mapping.get("regularizer_options", {}), "weight_decay_reading": reading}
    grid = getattr(args, "strength_grid", None)
    if grid is not None:  # one grid for every regularizer with a strength (none and SN have none)
        from dreg_jax.training.regularizers import DEFAULT_STRENGTHS

        regularizers = mapping.get("regularizers") or SweepConfig().regularizers
        mapping["strengths"] = {**mapping.get("strengths", {}),
                                **{r: list(grid) for r in regularizers if DEFAULT_STRENGTHS[r] is not None}}
    return SweepConfig.from_mapping(mapping)


def _sweep_mesh(args):
    """The sweep's devices: joins the distributed job first (``--distributed``), then a mesh over
    ``--devices`` (default every device of every process; one device: no mesh)."""
    import jax

    from dreg_jax.engine import initialize_distributed, run_mesh

    if args.cpu_devices is not None:  # before JAX starts its backends
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.distributed:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    elif any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
        raise ValueError("--coordinator, --num-processes and --process-id describe a distributed job: add --distributed")
    available = jax.device_count()
    wanted = available if args.devices is None else args.devices
    if wanted > available:
        raise ValueError(f"--devices {wanted} but JAX sees {available} device(s) here; on a CPU, --cpu-devices "
                         f"{wanted} exposes that many")
    if jax.process_count() > 1 and wanted != available:
        raise ValueError(f"--devices {wanted}: a distributed sweep uses every process's devices ({available}); "
                         "leave --devices out")
    return run_mesh(jax.devices()[:wanted]) if wanted > 1 else None


def cmd_sweep(args) -> int:
    from dreg_jax.engine import EngineOptions, run_sweep, summary_table

    mesh = _sweep_mesh(args)
    import jax

    writer = jax.process_index() == 0
    if writer:  # the only process that writes (the others may not see the file)
        check_outputs({"--results": args.results}, _inputs(args))
    specs = _sweep_config(args).expand()  # validated before anything compiles
    if args.shard is not None:
        from dreg_jax.engine.sweep import shard_specs

        index, count = args.shard
        total, specs = len(specs), shard_specs(specs, index, count)
        if writer:
            print(f"shard {index}/{count}: {len(specs)} of the grid's {total} runs")
        if not specs:
            return 0
    from dreg_jax.engine import enable_compilation_cache

    enable_compilation_cache()
    devices = 1 if mesh is None else mesh.size
    if writer:
        print(f"{len(specs)} runs -> {args.results} ({devices} device(s)"
              + (f", {jax.process_count()} processes" if jax.process_count() > 1 else "") + ")")
    start = time.perf_counter()
    records = run_sweep(specs, args.results, chunk_size=args.chunk_size, mesh=mesh, progress=writer,
                        options=EngineOptions(per_epoch_diagnostics=not args.no_epoch_diagnostics,
                                              vmap_width=args.vmap_width))
    if not writer:
        return 0
    print(summary_table(records))
    bad = [r for r in records if r["status"] != "ok"]
    for r in bad:
        s, hp = r["spec"], r.get("hparams") or {}
        step = r.get("fail_step") if r["status"] == "failed" else r.get("diverge_step")
        print(f"{r['status']}: run {r['run_id']} at step {step} ({s['dataset']}, "
              f"{s['config']['model']['activation']}, {s['config']['regularizer']['kind']}, seed {s['seed']}, "
              f"learning rate {hp.get('learning_rate', s['config']['optimizer']['learning_rate'])}, "
              f"strength {hp.get('strength', s['config']['regularizer']['strength'])}, "
              f"fraction {s['data_fraction']})")
    failed = sum(r["status"] == "failed" for r in records)
    diverged = sum(r["status"] == "diverged" for r in records)
    print(f"{len(records)} runs ({failed} failed, {diverged} diverged) in {time.perf_counter() - start:.1f}s")
    return 0


#: tuned beside the asked regularizers (``--no-baseline`` drops them): no regularizer, and a
#: weight decay that acts (the default ``per_step`` reading: theta -= strength * theta each step)
TUNE_BASELINES = ("none", "weight_decay")
#: tune's learning rates when neither --learning-rates nor --config gives them: every strength
#: is tried with each, and a pick at an end of this set is flagged
TUNE_LEARNING_RATES = (3e-4, 1e-3, 3e-3)


def cmd_tune(args) -> int:
    check_writable_directory(args.out, "--out")  # before any work: outputs writable, never an input
    if args.save_model is not None:
        check_writable_directory(args.save_model, "--save-model")
    check_outputs({"--out": args.out, "--save-model": args.save_model}, _inputs(args))
    if args.folds is not None and args.folds < 2:
        raise ValueError(f"--folds must be >= 2 (K-fold cross-validation), got {args.folds}")
    if getattr(args, "validation_fraction", None) is None and args.csv is None:
        # built-in sets: a stratified 20% of training to choose on (K folds use every training row)
        args.validation_fraction = 0.0 if args.folds else 0.2
    if args.learning_rates is None and not (args.config and "learning_rates" in _load_mapping(args.config)):
        args.learning_rates = list(TUNE_LEARNING_RATES)  # tuned with the strength unless given
    sweep = _sweep_config(args)
    if len(sweep.datasets) != 1:
        raise ValueError(f"tune chooses on one dataset at a time, got {list(sweep.datasets)}")
    # every asked regularizer is tuned (none and SN: their learning rate only), beside the baselines
    kinds = list(dict.fromkeys(([] if args.no_baseline else list(TUNE_BASELINES)) + list(sweep.regularizers)))
    locks = contextlib.ExitStack()
    if args.save_model is not None:  # fail before training, not after it
        from dreg_jax.saved_model import check_model_directory, model_directory_lock

        for kind in kinds:
            check_model_directory(args.save_model / kind)
    for kind in kinds if args.save_model is not None else ():  # held from now until saved
        locks.enter_context(model_directory_lock(args.save_model / kind))
    with locks:
        return _tune(args, sweep, kinds)


def _tune(args, sweep, kinds) -> int:
    from dreg_jax.engine import engine_data
    from dreg_jax.training.regularizers import get_regularizer
    from dreg_jax.tuning import plot_tuning, tune

    args.out.mkdir(parents=True, exist_ok=True)
    template = dataclasses.replace(sweep, regularizers=(kinds[0],), seeds=1, strengths={}).expand()[0]
    data, num_classes = engine_data(template.dataset, template.featurizer, template.validation_fraction)
    seeds = sweep.seeds if isinstance(sweep.seeds, int) else tuple(sweep.seeds)
    results = []
    for number, kind in enumerate(kinds, 1):
        scored = (f"{args.folds}-fold cross-validation of {len(data.y_train) + len(data.y_val)} rows" if args.folds
                  else f"{len(data.y_val)} validation rows")
        print(f"[{number}/{len(kinds)}] tuning {kind} on {scored} ...", flush=True)
        config = dataclasses.replace(template.config, regularizer=dataclasses.replace(
            template.config.regularizer, kind=kind, strength=None))
        # --strengths applies to the regularizers that have one (the baseline tunes its learning rate)
        grid = (sweep.strengths or {}).get(kind) if get_regularizer(kind).default_strength is not None else None
        result = tune(data, config, num_classes, strengths=grid, learning_rates=sweep.learning_rates,
                      seeds=seeds, max_extensions=args.max_extensions, keep_model=True,  # scored on held-out rows
                      preprocessing=_preprocessing_of(template.dataset), folds=args.folds or 1,
                      options=_early_stopping(args, per_epoch_diagnostics=False))
        results.append(result)
        print(f"{kind}: strength {result.strength:.3g}, learning rate {result.learning_rate:g} "
              f"(validation rows {result.validation_rows}, {result.extensions} grid extension(s))")
        print(result.table())
        if result.note:
            print(f"note: {result.note}")
    held = None
    if "none" in kinds and len(kinds) > 1 and len(data.y_test):
        from dreg_jax.tuning import held_out_comparison

        how = "trained again at its pick" if args.folds else "its runs at its pick"
        print(f"scoring every arm ({how}, {len(seeds) if not isinstance(seeds, int) else seeds} seeds) on the "
              f"{len(data.y_test)} held-out rows (never seen by the picks) ...", flush=True)
        held = held_out_comparison(data, template.config, num_classes, results, seeds=seeds,
                                   options=_early_stopping(args, per_epoch_diagnostics=False),
                                   preprocessing=_preprocessing_of(template.dataset))
        print(f"\nheld-out comparison ({held.held_out_rows} rows):")
        print(held.table())
    report = "\n\n".join(f"## {r.regularizer}\n\n{r.table()}" + (f"\n\nNote: {r.note}" if r.note else "")
                         for r in results) + "\n"
    if held is not None:
        report += f"\n## Held-out comparison ({held.held_out_rows} rows, picks fixed first)\n\n{held.table()}\n"
    atomic_write(args.out / "tune.md", report)
    atomic_write(args.out / "tune.json", json.dumps({"picks": [r.to_dict() for r in results],
                                                     "held_out": None if held is None else held.to_dict()},
                                                    indent=2, default=_json_number))
    plot_tuning(results, args.out / "tune.png")
    written = [args.out / "tune.md", args.out / "tune.json", args.out / "tune.png"]
    if held is not None and held.comparisons:
        written.append(held.plot(args.out / "held_out.png"))
    print(f"wrote {', '.join(map(str, written))}")
    for r in results if args.save_model is not None else ():
        directory = args.save_model / r.regularizer
        r.model.save(directory)
        print(f"saved the {r.regularizer} model at its pick to {directory}")
    print(_compile_line())
    return 0


def _compile_line() -> str:
    """What this command compiled and ran (``compiled programs: N, compile seconds: S, run seconds: R``)."""
    from dreg_jax.engine.grid import PROCESS_STATS

    return PROCESS_STATS.line()


def _early_stopping(args, **options):
    """EngineOptions with ``--patience`` (best validation epoch kept, a run stops after
    ``patience`` epochs without improving it), or the engine's defaults without it."""
    from dreg_jax.engine import EngineOptions

    patience = getattr(args, "patience", None)
    if patience is None:
        return EngineOptions(**options)
    return EngineOptions(restore_best_epoch=True, patience=patience, **options)


def cmd_train(args) -> int:
    args.seeds = [args.seed]
    for single, plural in (("dataset", "datasets"), ("activation", "activations"),
                           ("regularizer", "regularizers"), ("fraction", "fractions"),
                           ("learning_rate", "learning_rates"),
                           ("strength_schedule", "strength_schedules")):
        value = getattr(args, single)
        setattr(args, plural, None if value is None else [value])
    for noise in ("label_noise", "input_noise"):
        setattr(args, noise, None if getattr(args, noise) is None else [getattr(args, noise)])
    if args.out is not None:  # fail before training, not after it (the run would be lost)
        check_writable_file(args.out, "--out")
    lock = contextlib.nullcontext()
    if args.save_model is not None:
        from dreg_jax.saved_model import check_model_directory, model_directory_lock

        check_model_directory(args.save_model)
        lock = model_directory_lock(args.save_model)  # held from before training until saved
    check_outputs({"--out": args.out, "--save-model": args.save_model}, _inputs(args))
    with lock:
        return _train(args)


def _robust_names(spec):
    """Names of the robustness sets of a run's dataset (the order of its robust accuracies), as
    sweep names them (the dataset is cached: loading it again costs nothing)."""
    from dreg_jax.data import load_dataset

    return load_dataset(spec.dataset, featurizer=spec.featurizer).robust


def _train(args) -> int:
    sweep = _sweep_config(args)
    if args.strength is not None:
        import dataclasses

        sweep = dataclasses.replace(sweep, strengths={k: args.strength for k in sweep.regularizers})
    (spec,) = sweep.expand()
    from dreg_jax.engine import train_many
    from dreg_jax.engine.run import RunHParams
    from dreg_jax.engine.sweep import engine_data

    data, num_classes = engine_data(spec.dataset, spec.featurizer, spec.validation_fraction)
    if args.patience is not None and (data.x_val is None or len(data.x_val) == 0):
        raise ValueError("--patience stops on the validation score, and this run has no validation split: "
                         "add --validation-fraction 0.2 (built-in sets) or use --csv (which holds one out)")
    print(f"training {spec.dataset} {spec.config.model.activation} {spec.config.regularizer.kind} for "
          f"{spec.config.epochs} epochs as one compiled program (compiling takes ~5-30 s on a CPU) ...",
          flush=True)
    start = time.perf_counter()
    final, curves = train_many(RunHParams.stack([spec.hparams()]), data, spec.config, num_classes,
                               _early_stopping(args, return_variables=args.save_model is not None))
    variables = final.pop("variables", None)
    import numpy as np

    from dreg_jax.engine.sweep import _status, _to_json
    from dreg_jax.training.tasks import score_name

    metrics = {k: _to_json(v[0]) for k, v in final.items()}
    score = score_name(spec.config.task)
    status = _status(metrics["fail_step"], metrics["diverge_step"])
    out = {"run_id": spec.run_id, "spec": spec.to_dict(), "status": status, "metrics": metrics,
           "curves": {k: _to_json(v[0]) for k, v in curves.items()},
           "seconds": time.perf_counter() - start}
    print(f"run {spec.run_id}: {spec.dataset} {spec.config.model.activation} "
          f"{spec.config.regularizer.kind}, {spec.config.epochs} epochs, {out['seconds']:.1f}s")
    if "epochs_run" in metrics:
        print(f"  early stopping: ran {metrics['epochs_run']} of at most {spec.config.epochs} epochs, kept epoch "
              f"{metrics['best_epoch']} (the best validation {score}); the metrics below are that epoch's")
    shown = lambda v: "nan" if v is None else f"{v:.4f}"  # noqa: E731 - a diverged run's NaN is stored as null
    for k in (f"test_{score}", f"validation_{score}", "test_loss", f"robust_{score}", "tau", "volatility_peak"):
        if k in metrics:
            print(f"  {k:<16} {shown(metrics[k])}")
    record = _preprocessing_of(spec.dataset)
    if spec.config.task == "regression" and record is not None and metrics["test_loss"] is not None:
        # test_loss is the MSE of the standardized target: its root times the target's deviation
        print(f"  test_rmse        {np.sqrt(metrics['test_loss']) * record.target_std:.4g} (target units)")
    print(f"  jacobian terms   [{', '.join(shown(v) for v in metrics['jacobian_sq_norms'])}]")
    if metrics["fail_step"] >= 0:
        print(f"  FAILED: non-finite loss at step {metrics['fail_step']}")
    elif metrics["diverge_step"] >= 0:
        print(f"  DIVERGED: data loss exploded at step {metrics['diverge_step']}")
    if args.out:  # the row sweep writes (one JSON line): results and plot read it
        from dreg_jax.engine.sweep import _records

        row = _records([spec], final, curves, out["seconds"], list(_robust_names(spec)),
                       {"devices": 1, "processes": 1, "vmap_width": 1})[0]
        atomic_write(args.out, json.dumps(row, allow_nan=False) + "\n", what="--out")
        print(f"wrote {args.out} (a results row: `dreg-jax results {args.out}`)")
    if args.save_model is not None:
        if status != "ok":
            step = metrics["fail_step"] if status == "failed" else metrics["diverge_step"]
            print(f"  the run {spec.run_id} {status} at step {step}: no model saved to {args.save_model}")
        else:
            import jax

            _save_model(args.save_model, jax.tree_util.tree_map(lambda a: a[0], variables), spec.config,
                        num_classes, data, spec.dataset,
                        {"seed": spec.seed, "learning_rate": spec.config.optimizer.learning_rate,
                         **{k: metrics[k] for k in (f"validation_{score}", f"test_{score}") if k in metrics}})
    print(_compile_line())
    return 0 if status == "ok" else 1


def _preprocessing_of(dataset: str):
    from dreg_jax.data.registry import USER_DATASETS

    ds = USER_DATASETS.get(dataset)
    return None if ds is None else ds.preprocessing


def _save_model(directory, variables, config, num_classes, data, dataset, run):
    from dreg_jax.saved_model import save_model

    strength = config.regularizer.resolved_strength()  # recorded in the config and the run facts
    config = dataclasses.replace(config, regularizer=dataclasses.replace(config.regularizer, strength=strength))
    save_model(directory, variables, config, num_classes, int(data.x_train.shape[1]),
               preprocessing=_preprocessing_of(dataset), run={"dataset": dataset, "strength": strength, **run})
    print(f"saved the model to {directory} (dreg-jax predict --model {directory} --csv NEW.csv --out OUT.csv)")


def cmd_predict(args) -> int:
    import csv

    from dreg_jax.saved_model import load_model

    check_writable_file(args.out, "--out")
    check_outputs({"--out": args.out}, {"--model": args.model, "--csv": args.csv})
    model = load_model(args.model)
    if model.task == "regression":
        return _predict_values(args, model)
    names = model.labels(range(model.num_classes))
    counts = dict.fromkeys(names, 0)
    with atomic_output(args.out, what="--out", newline="") as f:  # whole or not at all
        writer = csv.writer(f)
        writer.writerow(["line", "predicted", *(f"probability_{n}" for n in names)])
        for labels, probabilities, lines in model.predict_csv_chunks(args.csv, args.encoding):
            for line, label, p in zip(lines, labels, probabilities):
                writer.writerow([line, label, *(f"{v:.6g}" for v in p)])
                counts[label] += 1
    print(f"predicted {sum(counts.values())} rows of {args.csv} -> {args.out} "
          f"({', '.join(f'{n}: {c}' for n, c in counts.items())})")
    return 0


def _predict_values(args, model) -> int:
    """``predict`` of a regression model: one value per row, in the target's units."""
    import csv

    import numpy as np

    count, low, high, total = 0, np.inf, -np.inf, 0.0
    with atomic_output(args.out, what="--out", newline="") as f:  # whole or not at all
        writer = csv.writer(f)
        writer.writerow(["line", "predicted"])
        for values, _, lines in model.predict_csv_chunks(args.csv, args.encoding):
            for line, value in zip(lines, values):
                writer.writerow([line, f"{value:.8g}"])
            count += len(values)
            if len(values):
                low, high, total = min(low, values.min()), max(high, values.max()), total + values.sum()
    summary = f"mean {total / count:.4g}, from {low:.4g} to {high:.4g}" if count else "no rows"
    print(f"predicted {count} rows of {args.csv} -> {args.out} ({model.preprocessing.target} values: {summary})")
    return 0


def cmd_results(args) -> int:
    from dreg_jax.analysis.results import load_records, results_frame
    from dreg_jax.engine import summary_table

    from dreg_jax.engine.store import results_paths

    files = results_paths(args.file)  # patterns expanded, missing files refused
    if args.csv is not None:
        check_writable_file(args.csv, "--csv")
        check_outputs({"--csv": args.csv}, {f"results file {f.name}": f for f in files})
    records = load_records(files)  # read once; a reader never changes a file
    frame = results_frame(records)
    print(summary_table(records))
    print(f"{len(frame)} runs, {frame.shape[1]} columns")
    if args.csv:
        atomic_write(args.csv, frame.to_csv(index=False), what="--csv")
        print(f"wrote {args.csv}")
    return 0


def cmd_plot(args) -> int:
    from dreg_jax.analysis.results import plot_results

    from dreg_jax.engine.store import results_paths

    files = results_paths(args.file)
    check_writable_directory(args.out, "--out")
    check_outputs({"--out": args.out}, {f"results file {f.name}": f for f in files})
    for path in plot_results(files, args.out):
        print(f"wrote {path}")
    return 0


def cmd_data(args) -> int:
    import numpy as np

    from dreg_jax.data import OFFLINE, PUBLIC, check_dataset, load_dataset

    if args.data_command == "list":
        print(f"{'name':<42}{'kind':<9}{'train':>8}{'test':>7}{'classes':>9}  how")
        for name, info in OFFLINE.items():
            ds = load_dataset(name, data_dir=args.data_dir)
            messy = " (messy)" if info.messy else ""
            print(f"{name:<42}{info.kind:<9}{len(ds.x_train):>8}{len(ds.x_test):>7}"
                  f"{info.num_classes:>9}  offline{messy}")
        shown = set()
        for name, info in PUBLIC.items():
            label = "cifar10_corrupted/<corruption>_<1..5> (95)" if "cifar10_corrupted" in name else name
            if label in shown:
                continue
            shown.add(label)
            print(f"{label:<42}{info.kind:<9}{info.train_size:>8}{info.test_size:>7}"
                  f"{info.num_classes:>9}  download")
        return 0
    check_dataset(args.name)
    ds = load_dataset(args.name, data_dir=args.data_dir)
    print(f"{ds.name}: {ds.kind}, {len(ds.x_train)} train / {len(ds.x_test)} test, "
          f"{ds.num_features} features, {ds.num_classes} classes, {ds.info.source}")
    print("train class counts:", np.bincount(ds.y_train, minlength=ds.num_classes).tolist())
    print("test class counts: ", np.bincount(ds.y_test, minlength=ds.num_classes).tolist())
    print(f"robust test sets ({len(ds.robust)}):", ", ".join(ds.robust) or "none")
    if ds.kind == "text":
        print("example:", repr(ds.raw_test[0][:200]))
    if ds.info.image_shape is not None:
        from dreg_jax.data.plots import save_examples_png

        path = save_examples_png(ds, args.out / f"{ds.name.replace('/', '_')}.png")
        print(f"wrote {path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage text lists ~100 dataset names)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _shard(text: str) -> tuple[int, int]:
    index, slash, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        index = count = -1
    if not slash or count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share I/N with 0 <= I < N (e.g. 0/4, "
                                         "or $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return index, count


def _dataset_name(text: str) -> str:
    from dreg_jax.data import check_dataset

    try:
        return check_dataset(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None




def _top_level_parser(with_commands: bool):
    """The ``dreg-jax`` parser's top level; with ``with_commands`` the subcommands' names and help
    only (what ``dreg-jax --help`` prints), built without importing JAX."""
    parser = _Parser(prog="dreg-jax", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dreg-jax {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    if with_commands:
        for name, text in COMMANDS.items():
            sub.add_parser(name, help=text)
    return parser, sub


def build_parser() -> argparse.ArgumentParser:
    from dreg_jax.data.registry import FEATURIZERS
    from dreg_jax.layers.activations import ACTIVATIONS
    from dreg_jax.penalties.schedules import SCHEDULES
    from dreg_jax.preprocessing import TASKS
    from dreg_jax.training.config import CLASS_WEIGHTS, REGULARIZERS
    from dreg_jax.training.regularizers import WEIGHT_DECAY_READINGS

    parser, sub = _top_level_parser(with_commands=False)
    dataset_help = "a dataset name (`dreg-jax data list`: 15 offline sets, public TFDS names)"

    from dreg_jax.engine.sweep_config import SweepConfig

    defaults = SweepConfig()  # every command's defaults come from here, and --help says them
    said = lambda v: " ".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)  # noqa: E731

    def grid_options(p, plural: bool, learning_rates_help: str | None = None):
        if plural:
            p.add_argument("--datasets", nargs="+", type=_dataset_name, metavar="NAME",
                           help=f"{dataset_help} (default {said(defaults.datasets)})")
            p.add_argument("--activations", nargs="+", choices=ACTIVATIONS,
                           help=f"(default {said(defaults.activations)})")
            p.add_argument("--regularizers", nargs="+", choices=REGULARIZERS,
                           help=f"(default {said(defaults.regularizers)})")
            p.add_argument("--seeds", type=_positive_int, help=f"number of seeds (0..n-1) (default {defaults.seeds})")
            p.add_argument("--fractions", nargs="+", type=float,
                           help=f"training fractions in (0, 1] (default {said(defaults.fractions)})")
            p.add_argument("--label-noise", dest="label_noise", nargs="+", type=float,
                           help="shares of training labels replaced by random ones (default 0)")
            p.add_argument("--input-noise", dest="input_noise", nargs="+", type=float,
                           help="stds of Gaussian noise added to the training inputs (default 0)")
            p.add_argument("--learning-rates", dest="learning_rates", nargs="+", type=float,
                           help=(learning_rates_help
                                 or f"Adam learning rates (default {said(defaults.learning_rates)})"))
            p.add_argument("--strengths", dest="strength_grid", nargs="+", type=float, metavar="LAMBDA",
                           help="strengths for every regularizer that has one (default: each one's own)")
            p.add_argument("--strength-schedules", dest="strength_schedules", nargs="+", choices=SCHEDULES,
                           help="lambda schedules for the dreg runs (default constant)")
        p.add_argument("--hidden", nargs="+", type=int, help=f"hidden widths (default {said(defaults.hidden)})")
        p.add_argument("--epochs", type=_positive_int, help=f"(default {defaults.epochs})")
        p.add_argument("--batch-size", dest="batch_size", type=_positive_int, help=f"(default {defaults.batch_size})")
        p.add_argument("--dreg-scope", dest="dreg_scope", choices=["activation", "layer"],
                       help=f"(default {defaults.dreg_scope})")
        p.add_argument("--task", choices=TASKS,
                       help="classification (every distinct target value a class; the default) or regression "
                            "(a numeric --csv target, predicted as a number: squared-error loss on the "
                            "standardized target, scored by R^2, RMSE and MAE)")
        p.add_argument("--class-weight", dest="class_weight", choices=CLASS_WEIGHTS,
                       help="balanced: weight each training example's loss by n / (C n_c) of its class "
                            "(imbalanced labels; metrics stay unweighted) (default none)")
        p.add_argument("--weight-decay-reading", dest="weight_decay_reading", choices=WEIGHT_DECAY_READINGS,
                       help="how weight_decay's strength enters AdamW's decoupled decay: per_step "
                            "(theta -= strength * theta every step; the default), times_lr (times the "
                            "learning rate, as optax/PyTorch: inert at the default strength) or normalized "
                            "(strength / sqrt(total steps))")
        p.add_argument("--featurizer", choices=FEATURIZERS,
                       help="text features: hashed n-grams (default) or minilm (needs the encoder extra)")
        p.add_argument("--config", type=pathlib.Path, help="YAML/JSON file of SweepConfig keys (flags override it)")
        p.add_argument("--validation-fraction", dest="validation_fraction", type=float,
                       help="stratified share of the training rows held out for validation (default: 0 for "
                            "built-in datasets, their published splits, 0.2 under tune; 0.1 for --csv)")
        p.add_argument("--csv", type=pathlib.Path, help="your own data: a CSV with a header row (replaces the dataset)")
        p.add_argument("--target", help="the label column of --csv")
        p.add_argument("--test-csv", dest="test_csv", type=pathlib.Path,
                       help="a test CSV with the same columns (default: a stratified 20%% of --csv)")
        p.add_argument("--split-seed", dest="split_seed", type=int,
                       help="seed of the test/validation splits of --csv (default 0)")
        p.add_argument("--drop", nargs="+", metavar="COLUMN",
                       help="columns of --csv to leave out (ids, names, leakage)")
        p.add_argument("--keep", nargs="+", metavar="COLUMN",
                       help="columns of --csv the identifier rule refuses (a distinct value in every row) "
                            "that are real features")
        p.add_argument("--encoding",
                       help="text encoding of --csv (default UTF-8; e.g. latin-1, cp1252)")

    def patience_option(p):
        p.add_argument("--patience", type=_positive_int, metavar="EPOCHS",
                       help="early stopping: keep the best validation epoch and stop a run after this many "
                            "epochs without improving it (--epochs is then the cap; needs a validation split)")

    p_train = sub.add_parser("train", help=COMMANDS["train"])
    p_train.add_argument("--dataset", type=_dataset_name, default=defaults.datasets[0], metavar="NAME",
                         help=f"{dataset_help} (default {defaults.datasets[0]})")
    p_train.add_argument("--activation", choices=ACTIVATIONS, default=defaults.activations[0],
                         help=f"(default {defaults.activations[0]}, as sweep and tune)")
    p_train.add_argument("--regularizer", choices=REGULARIZERS, default="dreg", help="(default dreg)")
    p_train.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    p_train.add_argument("--fraction", type=float,
                         help=f"share of the training split used, in (0, 1] (default {said(defaults.fractions)})")
    p_train.add_argument("--label-noise", dest="label_noise", type=float,
                         help="share of training labels replaced by random ones (default 0)")
    p_train.add_argument("--input-noise", dest="input_noise", type=float,
                         help="std of Gaussian noise added to the training inputs (default 0)")
    p_train.add_argument("--learning-rate", dest="learning_rate", type=float,
                         help=f"Adam's learning rate (default {said(defaults.learning_rates)})")
    p_train.add_argument("--strength", type=float, help="regularization strength (default per regularizer)")
    p_train.add_argument("--strength-schedule", dest="strength_schedule", choices=SCHEDULES,
                         help="lambda schedule of the dreg penalty (default constant)")
    p_train.add_argument("--out", type=pathlib.Path,
                         help="write the run's results row (metrics and curves; the JSON line sweep "
                              "writes, so `dreg-jax results` and `plot` read it)")
    p_train.add_argument("--save-model", dest="save_model", type=pathlib.Path, metavar="DIR",
                         help="keep the trained model in DIR (dreg_jax.load_model, dreg-jax predict)")
    grid_options(p_train, plural=False)
    patience_option(p_train)
    p_train.set_defaults(func=cmd_train)

    p_sweep = sub.add_parser("sweep", help=COMMANDS["sweep"])
    grid_options(p_sweep, plural=True)
    p_sweep.add_argument("--results", type=pathlib.Path, default=pathlib.Path("results/sweep.jsonl"),
                         help="results JSONL: one row per run, appended; an existing file is resumed "
                              "(default results/sweep.jsonl)")
    p_sweep.add_argument("--chunk-size", dest="chunk_size", type=_positive_int, default=64,
                         help="runs trained per results append (whole blocks of --vmap-width runs; default 64)")
    p_sweep.add_argument("--no-epoch-diagnostics", action="store_true",
                         help="compute tau only at the end (faster)")
    scale = p_sweep.add_argument_group(
        "devices and processes",
        "Runs are sharded over every device JAX sees (one compiled call trains --vmap-width runs, spread "
        "over the devices). A run's last bits depend on the device count and the vmap width: each row "
        "records both (its 'layout'), and a resume on another layout says so. Several processes (hosts): "
        "start the same command on every one with --distributed; process 0 plans and writes --results, "
        "the others need not see the file.")
    scale.add_argument("--shard", type=_shard, metavar="I/N",
                       help="run only share I of N of the grid (0 <= I < N; a run's share is its run id modulo "
                            "N, so it stays put when the grid grows): a job array's task I writes its own "
                            "--results, and `dreg-jax results 'part-*.jsonl'` reads the shares as one table")
    scale.add_argument("--devices", type=_positive_int, metavar="N",
                       help="use the first N devices (default: all; 1: no sharding)")
    scale.add_argument("--vmap-width", dest="vmap_width", type=_positive_int, metavar="W",
                       help="runs per compiled call, rounded up to a multiple of the devices "
                            "(default 8 on a CPU, 256 on an accelerator)")
    scale.add_argument("--cpu-devices", dest="cpu_devices", type=_positive_int, metavar="N",
                       help="CPU only: how many CPU devices each process exposes (default 1)")
    scale.add_argument("--distributed", action="store_true",
                       help="join a jax.distributed job first: on SLURM, Open MPI and TPU pods JAX finds "
                            "the coordinator, process count and id itself; elsewhere give the three flags below")
    scale.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (with --distributed)")
    scale.add_argument("--num-processes", dest="num_processes", type=_positive_int, metavar="N",
                       help="processes in the job (with --distributed)")
    scale.add_argument("--process-id", dest="process_id", type=int, metavar="I",
                       help="this process's index, 0 .. N-1 (with --distributed)")
    p_sweep.set_defaults(func=cmd_sweep)

    p_tune = sub.add_parser("tune", help=COMMANDS["tune"])
    grid_options(p_tune, plural=True,  # tune's own default: the learning rate is tuned with the strength
                 learning_rates_help=(f"Adam learning rates, each tried with every strength (default "
                                      f"{' '.join(f'{lr:g}' for lr in TUNE_LEARNING_RATES)}; a pick at an end is "
                                      "flagged)"))
    patience_option(p_tune)
    p_tune.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/tune"),
                        help="folder for tune.md, tune.json, tune.png and held_out.png (default results/tune)")
    p_tune.add_argument("--folds", type=int, metavar="K",
                        help="choose by stratified K-fold cross-validation on the training rows (small "
                             "tables) instead of one validation split (default: one split)")
    p_tune.add_argument("--no-baseline", dest="no_baseline", action="store_true",
                        help="do not tune the baselines (none and weight_decay) beside the asked regularizers, "
                             "and skip the held-out comparison against none")
    p_tune.add_argument("--max-extensions", dest="max_extensions", type=int, default=2,
                        help="how often an edge pick may extend the grid (default 2)")
    p_tune.add_argument("--save-model", dest="save_model", type=pathlib.Path, metavar="DIR",
                        help="keep the model trained at each regularizer's pick (first seed) in DIR/<regularizer>")
    p_tune.set_defaults(func=cmd_tune)

    p_predict = sub.add_parser("predict", help=COMMANDS["predict"])
    p_predict.add_argument("--model", type=pathlib.Path, required=True, metavar="DIR",
                           help="a model directory (train/tune --save-model)")
    p_predict.add_argument("--csv", type=pathlib.Path, required=True,
                           help="rows with the training columns (any order; the target may be there)")
    p_predict.add_argument("--out", type=pathlib.Path, required=True,
                           help="predictions CSV: line, predicted label, one probability per class")
    p_predict.add_argument("--encoding", default="utf-8-sig", help="text encoding of --csv (default UTF-8)")
    p_predict.set_defaults(func=cmd_predict)

    p_results = sub.add_parser("results", help=COMMANDS["results"])
    p_results.add_argument("file", nargs="+", type=pathlib.Path,
                           help="results JSONL file(s) written by sweep/train, or glob patterns (a job "
                                "array's shards: 'results/part-*.jsonl'); read as one table")
    p_results.add_argument("--csv", type=pathlib.Path, help="write one flat row per run to this CSV")
    p_results.set_defaults(func=cmd_results)
    p_plot = sub.add_parser("plot", help=COMMANDS["plot"])
    p_plot.add_argument("file", nargs="+", type=pathlib.Path,
                        help="results JSONL file(s) or glob patterns, read as one table (as for results)")
    p_plot.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/plots"),
                        help="folder for the PNGs (default results/plots)")
    p_plot.set_defaults(func=cmd_plot)

    p_data = sub.add_parser("data", help=COMMANDS["data"])
    data_sub = p_data.add_subparsers(dest="data_command", required=True)
    p_list = data_sub.add_parser("list", help="every dataset with size, classes, kind and source")
    p_show = data_sub.add_parser("show", help="summary of one dataset (+ PNG of examples for images)")
    p_show.add_argument("name", help="a dataset name (`dreg-jax data list`)")
    p_show.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/data"),
                        help="folder for the PNG of examples (default results/data)")
    for p in (p_list, p_show):
        p.add_argument("--data-dir", dest="data_dir", type=pathlib.Path, default=None,
                       help="TFDS data dir (default $DREG_JAX_DATA_DIR or ~/.cache/dreg_jax/tfds)")
    p_data.set_defaults(func=cmd_data)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dreg_jax")
    except PackageNotFoundError:  # a source checkout that was not installed
        return "unknown (not installed: pip install -e .)"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """A warning as one line that names no library file (the message says where and what)."""
    print(f"dreg-jax: warning: {_one_line(message)}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    with warnings.catch_warnings(), interrupts_delivered():
        warnings.showwarning = _show_warning
        return _main(argv)


#: Seconds after a Ctrl-C at which it is delivered again if the command has not stopped.
REDELIVER_SECONDS = 0.5
_INTERRUPT = {"pending": False}  # a Ctrl-C arrived and the command has not stopped for it yet


@contextlib.contextmanager
def interrupts_delivered():
    """Ctrl-C always stops the command. Python raises ``KeyboardInterrupt`` wherever the main
    thread is, and inside a callback (JAX registers one with the garbage collector) the exception
    is printed as "Exception ignored" and dropped: the command ran on and exited 0. While this is
    active, a Ctrl-C that has not stopped the command within :data:`REDELIVER_SECONDS` is sent
    again, and dropped interrupts are not printed. Only on the main thread and only over
    Python's own handler (an ignored SIGINT, e.g. under ``nohup``, stays ignored)."""
    import signal
    import threading

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield _INTERRUPT
        return

    def redeliver():
        if _INTERRUPT["pending"]:
            os.kill(os.getpid(), signal.SIGINT)

    def handler(signum, frame):
        _INTERRUPT["pending"] = True
        timer = threading.Timer(REDELIVER_SECONDS, redeliver)
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    previous_hook = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _INTERRUPT["pending"]:
            return  # dropped by a callback: delivered again
        previous_hook(unraisable)

    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = hook
    try:
        yield _INTERRUPT
    finally:
        _INTERRUPT["pending"] = False
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook


def _main(argv) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        if not argv or argv[0] in ("-h", "--help", "--version"):  # no command: nothing imports JAX
            _top_level_parser(with_commands=True)[0].parse_args(argv)
        try:
            parser = build_parser()
        except ImportError as err:  # the core install: say which extra to add
            print(f"dreg-jax: error: {err}", file=sys.stderr)
            return 2
        args = parser.parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:  # every write is whole or not at all: nothing is left half written
        _INTERRUPT["pending"] = False
        print("dreg-jax: interrupted; every file is as it was or complete (nothing half written)",
              file=sys.stderr)
        return INTERRUPTED
    except (ValueError, TypeError, RuntimeError, OSError, MemoryError, RecursionError) as err:
        print(f"dreg-jax: error: {_one_line(err)}", file=sys.stderr)  # one clear line, not a traceback
        return 2
    except Exception as err:  # noqa: BLE001 - a bug of ours: still one line, with how to see more
        if os.environ.get("DREG_JAX_DEBUG"):
            raise
        print(f"dreg-jax: internal error: {type(err).__name__}: {_one_line(err)} (DREG_JAX_DEBUG=1 shows the "
              "traceback; please report it)", file=sys.stderr)
        return 2


#: Exit status of an interrupted command (128 + SIGINT, as shells report it).
INTERRUPTED = 130


def _one_line(err) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


def console_main():
    """The ``dreg-jax`` script: :func:`main`, leaving at once after an interrupt (XLA's threads
    can crash an ordinary interpreter shutdown that follows a Ctrl-C mid-computation)."""
    code = main()
    if code == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
