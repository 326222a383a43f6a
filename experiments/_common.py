"""Shared pieces of the experiment scripts: command line, XLA flags, the ChainzRule model
sweeps, the wall-time ledger, plots.

Study orchestration lives here in ``experiments/``; the library (``dreg_jax.analysis``) keeps
the statistics and the report writing.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pathlib

#: (activation, regularizer) -> model name used in the reports.
NEURAL_MODELS = {("chainzrule", "dreg"): "CR+DREG", ("chainzrule", "none"): "CR", ("relu", "none"): "ReLU",
                 ("relu", "dreg"): "ReLU+DREG", ("gelu", "none"): "GELU", ("gelu", "dreg"): "GELU+DREG"}
REFERENCE = "CR+DREG"


def fast_compile_flags():
    """LLVM -O1 for the small, compile-bound experiment programs (unless XLA_FLAGS sets it)."""
    if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()


#: ChainzRule without its tanh input clip (``chainzrule_input_bound=None``): the clip ablation.
NO_CLIP = " (no clip)"


def model_name(record) -> str:
    """The report name of a record's model (NEURAL_MODELS, + " (no clip)" for the ablation)."""
    c = record["spec"]["config"]
    name = NEURAL_MODELS[(c["model"]["activation"], c["regularizer"]["kind"])]
    clipped = c["model"].get("chainzrule_input_bound", 4.0) is not None
    return name if clipped or c["model"]["activation"] != "chainzrule" else name + NO_CLIP


def model_order(names) -> list[str]:
    """``names`` in report order: NEURAL_MODELS, then the clip ablation's."""
    names = set(names)
    order = list(NEURAL_MODELS.values()) + [n + NO_CLIP for n in NEURAL_MODELS.values()]
    return [n for n in order if n in names]


def present_models(records) -> list[str]:
    """The models of ``records`` in report order (:func:`model_order`)."""
    return model_order(model_name(r) for r in records)


def run_neural_models(datasets, fractions, seeds, hidden, epochs, batch_size, out: pathlib.Path,
                      progress: bool, per_epoch_diagnostics: bool = False, featurizer: str = "hashed",
                      clip_ablation: bool = False, validation_fraction: float = 0.2):
    """Every NEURAL_MODELS model on every dataset x fraction x seed; resumable in ``out``.

    ``clip_ablation`` adds ChainzRule with and without DREG and without its input clip.
    ``validation_fraction`` of each training split is held out (reported, and the only data
    any choice may be made on).
    """
    from dreg_jax.engine import enable_compilation_cache
    from dreg_jax.engine import EngineOptions, SweepConfig, run_sweep

    enable_compilation_cache()
    sweep = SweepConfig(datasets=tuple(datasets), activations=("chainzrule", "relu", "gelu"),
                        regularizers=("none", "dreg"), seeds=seeds, fractions=tuple(fractions),
                        hidden=tuple(hidden), epochs=epochs, batch_size=batch_size, featurizer=featurizer,
                        validation_fraction=validation_fraction)
    specs = sweep.expand()
    if clip_ablation:
        specs += dataclasses.replace(sweep, activations=("chainzrule",),
                                     model_options={"chainzrule_input_bound": None}).expand()
    return run_sweep(specs, out / "results.jsonl", progress=progress, report=False,
                     options=EngineOptions(per_epoch_diagnostics=per_epoch_diagnostics))


def by_model(records):
    """``{(dataset, fraction, model): [record, ...]}`` sorted by seed."""
    groups = collections.defaultdict(list)
    for r in sorted(records, key=lambda r: r["spec"]["seed"]):
        s = r["spec"]
        groups[(s["dataset"], s["data_fraction"], model_name(r))].append(r)
    return groups


def compile_summary() -> str:
    """The line every study ends with: ``compiled programs: N, compile seconds: S, run seconds: R``
    (everything this process compiled and ran)."""
    from dreg_jax.engine.grid import PROCESS_STATS

    return PROCESS_STATS.line()


def experiment_args(argv, doc: str, profiles: dict, name: str, add_arguments=None, run_label=None):
    """The shared command line of the experiment scripts: ``--profile``, ``--out``, ``--no-progress``.

    ``add_arguments(parser)``, if given, adds a script's own options; ``run_label(args)``, if
    given, names the default output folder instead of the profile name.

    Returns:
      ``(args, out)`` with ``out`` (default ``results/<name>/<profile>``) created.
    """
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=list(profiles), default="quick")
    parser.add_argument("--out", type=pathlib.Path, default=None, help=f"default results/{name}/<profile>")
    parser.add_argument("--no-progress", action="store_true")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    out = args.out or pathlib.Path("results") / name / (run_label(args) if run_label else args.profile)
    out.mkdir(parents=True, exist_ok=True)
    return args, out


def run_study(argv, doc: str, profiles: dict, name: str, run, write_report):
    """The body of a study script's ``main``: parse the command line, write ``meta.json``,
    ``results = run(profile, out, progress)``, then ``write_report(results, profile, out, wall)``;
    prints the report's summary, where it went and the compile/run line. Returns the results."""
    import time

    args, out = experiment_args(argv, doc, profiles, name)
    profile = profiles[args.profile]
    write_meta(out, name, args.profile)
    start = time.perf_counter()
    results = run(profile, out, not args.no_progress)
    print(write_report(results, profile, out, time.perf_counter() - start))
    print(f"wrote {out / 'report.md'}")
    print(compile_summary())
    return results


def wall_time_text(out: pathlib.Path, seconds: float | None) -> str:
    """Logs this invocation's wall time in ``out/wall_seconds.json``; returns the report's sentence.

    A resumed experiment reuses the runs already in ``out``, so the report states both this
    invocation's time and the sum over every invocation that built the results in ``out``.
    ``seconds=None`` (a report rebuilt from raw results) reads the ledger without adding to it.
    """
    import json

    ledger = out / "wall_seconds.json"
    log = json.loads(ledger.read_text()) if ledger.exists() else []
    if seconds is None:
        return (f"Wall time {sum(log):.1f} s over {len(log)} invocation(s) that built these results "
                "(report rebuilt from the raw results).")
    log.append(round(float(seconds), 1))
    ledger.write_text(json.dumps(log))
    return (f"Wall time {sum(log):.1f} s over {len(log)} invocation(s) that built these results "
            f"(this one {seconds:.1f} s; runs already in {out.name}/ are reused, not rerun).")


def write_meta(out: pathlib.Path, study: str, profile: str, **extra) -> dict:
    """``out/meta.json``: which study and profile wrote the results (read by rebuild_report.py)."""
    import json

    from dreg_jax._files import atomic_write

    meta = {"study": study, "profile": profile, **extra}
    atomic_write(out / "meta.json", json.dumps(meta, indent=1), what="meta.json")  # whole or as it was
    return meta


def load_raw_results(out: pathlib.Path) -> list[dict]:
    """The records of ``out/results.jsonl``, or of the committed ``out/results.jsonl.gz``
    (validated as a resumed sweep validates them)."""
    import gzip
    import shutil
    import tempfile

    from dreg_jax.analysis.results import load_records

    plain, packed = out / "results.jsonl", out / "results.jsonl.gz"
    if plain.exists():
        return load_records(plain)
    if not packed.exists():
        raise SystemExit(f"{out} has no results.jsonl or results.jsonl.gz: nothing to rebuild the report from")
    with tempfile.TemporaryDirectory() as tmp, gzip.open(packed, "rb") as src:
        target = pathlib.Path(tmp) / "results.jsonl"
        with open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return load_records(target)


def plot_accuracy_vs_fraction(acc: dict, datasets, fractions, seeds: int, models, path, reference=REFERENCE):
    """One panel per dataset: mean test accuracy over seeds vs training fraction, a line per model.

    ``acc`` maps ``(dataset, fraction, model, seed)`` to accuracy in [0, 1].
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for m in models:
            ys = [100 * np.nanmean([acc[(d, f, m, s)] for s in range(seeds)]) for f in fractions]
            ax.plot(fractions, ys, marker="o", label=m, lw=2.5 if m == reference else 1.2)
        ax.set_xscale("log")
        ax.set_xticks(fractions, [f"{int(round(100 * f))}%" for f in fractions])
        ax.set_title(d)
        ax.set_xlabel("training fraction")
        ax.set_ylabel("test accuracy (%)")
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def last_commit_of(path: str) -> str | None:
    """The short hash of the commit that last changed ``path`` (relative to the repository root),
    e.g. a study's pre-registration; None outside a git checkout."""
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(["git", "log", "-1", "--format=%h", "--", path], cwd=root,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def write_jsonl_gz(path: pathlib.Path, rows):
    """One sorted-key JSON line per row, gzip without a timestamp: the same rows give the same
    bytes (committed raw results)."""
    import gzip
    import json

    from dreg_jax._files import atomic_output

    with atomic_output(path, what="compact results", binary=True) as raw, \
            gzip.GzipFile(str(path), "wb", fileobj=raw, mtime=0) as f:  # whole or as it was; the
        # header names the file, not the temporary one, so the same rows still give the same bytes
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def compact_records(records, metrics, curves) -> list[dict]:
    """The committed raw results of a study: per run its id, status, spec, hyperparameters,
    ``study`` label, the named final ``metrics`` and ``curves``, floats to 7 significant digits
    (the full records stay in the run folder)."""
    def rounded(v):
        if isinstance(v, float):
            return float(f"{v:.7g}")
        if isinstance(v, list):
            return [rounded(x) for x in v]
        return v

    return [{"run_id": r["run_id"], "status": r["status"], "spec": r["spec"], "hparams": r.get("hparams"),
             **({"study": r["study"]} if "study" in r else {}),
             "metrics": {k: rounded(r["metrics"].get(k)) for k in metrics if k in r["metrics"]},
             "curves": {k: rounded(r["curves"][k]) for k in curves if k in r.get("curves", {})}}
            for r in records]


def read_jsonl_gz(path: pathlib.Path) -> list[dict]:
    import gzip
    import json

    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def cut_tokens(x, length: int):
    """Token rows ``[ids, mask]`` cut to their first ``length`` tokens (ids then mask)."""
    import numpy as np

    full = x.shape[1] // 2
    return np.concatenate([x[:, :length], x[:, full:full + length]], axis=1)
