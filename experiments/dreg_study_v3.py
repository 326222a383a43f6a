"""The DREG study v3: every arm tuned alike on tuning seeds, a final comparison on fresh seeds,
scarcity at equal passes, the dataset as the unit, effect sizes with intervals.

The design and the analysis were fixed in ``docs/preregistration.md`` before any v3 run; the
report links the commit that fixed it and lists the deviations.

Stage 1 (tuning, ``tuning.jsonl``): for every (dataset, fraction) one tuning draw of the data
(subset and validation split), on the tuning seeds, every arm over the same learning rates and,
where it has one, the same number of log-spaced strengths; a pick on an edge of the strengths
extends the grid (:func:`dreg_jax.tuning.edge_extension`), and the pick is
:func:`dreg_jax.tuning.choose` (best mean validation accuracy over the tuning seeds), the same
two functions ``dreg_jax.tune`` uses. The tuning datasets carry no test rows: their test arrays
are the validation arrays, so test data never enters stage 1.

Stage 2 (final, ``results.jsonl``): every arm at its pick on fresh seeds; seed ``s`` draws its
own subset and validation split (data draw ``s``). Two more arms run DREG at the paper's fixed
lambda = 10^-2.5 and learning rate 1e-3 (claim 5).

Every run trains ``epochs`` passes over its own training rows (steps = passes x
ceil(rows / batch)), scores its validation split every epoch and keeps the best epoch's
parameters (``EngineOptions.restore_best_epoch``): the same early-stopping rule for every arm.

Usage: python experiments/dreg_study_v3.py --profile quick|full|gpu [--out DIR]
"""
from __future__ import annotations

from _common import (compact_records, compile_summary, experiment_args, fast_compile_flags, last_commit_of,
                     read_jsonl_gz, write_jsonl_gz, write_meta)

fast_compile_flags()

import dataclasses  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402

from dreg_jax.data import load_dataset, register_dataset  # noqa: E402
from dreg_jax.data.registry import USER_DATASETS, stratified_holdout  # noqa: E402
from dreg_jax.engine import EngineOptions, RunSpec, run_sweep  # noqa: E402
from dreg_jax.training.config import ModelConfig, OptimizerConfig, RegularizerConfig, TrainConfig  # noqa: E402
from dreg_jax.tuning import choose, edge_extension  # noqa: E402

LAMBDA = 10 ** -2.5
#: arm -> (regularizer kind, DREG scope)
ARMS = {"none": ("none", None), "WD": ("weight_decay", None), "SN": ("spectral_norm", None),
        "IGPen": ("igpen", None), "JacReg": ("jacobian", None),
        "DREG-act": ("dreg", "activation"), "DREG-layer": ("dreg", "layer")}
#: claim 5: the paper's fixed lambda and learning rate, no tuning
FIXED_ARMS = {"DREG-act fixed": ("dreg", "activation"), "DREG-layer fixed": ("dreg", "layer")}
FIXED_LEARNING_RATE = 1e-3
#: the centre of each strength grid (the v2 paper strengths; DREG the paper's lambda, raw sum)
CENTRES = {"weight_decay": 0.05, "igpen": 1e-2, "jacobian": 1e-2, "dreg": LAMBDA}
#: the v2 readings, unchanged (see the v2 report's Settings)
OPTIONS = {"layer_estimator": "exact", "weight_decay_reading": "normalized", "spectral_norm_head": False}
ALL_DATASETS = ("pima", "breast_cancer", "digits", "digits_corrupted", "mnist1d", "mnist1d_noisy",
                "reviews", "reviews_noisy", "wine", "iris", "glass", "oj", "crabs", "swiss_labor", "birthwt")
#: declared before any run (docs/preregistration.md): the corrupted vision and text sets
MESSY = ("digits_corrupted", "mnist1d_noisy", "reviews_noisy")
TUNING_DRAW = 1000  # the tuning stage's data draw (final seeds draw 0..n-1)
TUNING_SEED_BASE = 1000  # tuning seeds are 1000, 1001, ...: never a final seed
#: where the run departs from docs/preregistration.md (the report lists them)
DEVIATIONS: list[str] = []


def preregistration_commit() -> str | None:
    """The commit that last changed docs/preregistration.md (None outside a git checkout)."""
    return last_commit_of("docs/preregistration.md")


@dataclasses.dataclass(frozen=True)
class Profile:
    datasets: tuple
    activations: tuple = ("relu", "gelu")
    fractions: tuple = (0.2, 0.5, 1.0)
    tuning_seeds: int = 2
    final_seeds: int = 10
    learning_rates: tuple = (1e-3, 3e-3, 1e-2)
    points: int = 5  # strengths per arm (log-spaced over +-decades around the centre)
    decades: float = 2.0
    max_extensions: int = 2
    epochs: int = 15  # passes over the run's own training rows (best epoch kept) ...
    min_steps: int = 150  # ... or more passes, until this many optimizer steps (small subsets)
    hidden: tuple = (64, 64)
    batch_size: int = 64
    validation_share: float = 0.2  # of each subset
    margin: float = 0.5  # equivalence margin, percentage points
    alpha: float = 0.05
    bootstrap: int = 4000


PROFILES = {
    "full": Profile(datasets=ALL_DATASETS),  # see docs/preregistration.md
    "quick": Profile(datasets=("pima", "digits_corrupted", "crabs", "wine"), activations=("relu", "gelu"),
                     fractions=(0.2, 1.0), tuning_seeds=1, final_seeds=3, learning_rates=(1e-3, 3e-3), points=3,
                     max_extensions=1, epochs=8, min_steps=40, bootstrap=1000),
    # one GPU: the same design with more seeds, wider grids and longer training
    "gpu": Profile(datasets=ALL_DATASETS, activations=("relu", "gelu", "tanh", "chainzrule"),
                   fractions=(0.1, 0.2, 0.5, 1.0), tuning_seeds=3, final_seeds=20,
                   learning_rates=(1e-4, 3e-4, 1e-3, 3e-3), points=7, decades=3.0, epochs=60),
    # the test suite's end-to-end check of the pipeline
    "tiny": Profile(datasets=("iris", "crabs"), activations=("relu", "gelu"), fractions=(0.5, 1.0),
                    tuning_seeds=1, final_seeds=2, learning_rates=(3e-3,), points=3, max_extensions=1,
                    epochs=2, min_steps=4, hidden=(8,), bootstrap=200),
}


def grid(kind: str, profile: Profile) -> list[float]:
    """The arm's starting strengths: ``points`` log-spaced over +-``decades`` around its centre."""
    centre = CENTRES[kind]
    return [float(centre * 10 ** e) for e in np.linspace(-profile.decades, profile.decades, profile.points)]


def step_decades(profile: Profile) -> float:
    return 2 * profile.decades / (profile.points - 1)


def draw_dataset(name: str, fraction: float, draw: int, profile: Profile, tuning: bool):
    """The registered dataset of one data draw: a stratified ``fraction`` of the training split,
    of which a stratified ``validation_share`` is the validation split (the rest trains). A
    tuning draw's test and robust arrays are zeros of the test set's shape: no test row enters
    stage 1, and both stages share their compiled programs (the same shapes)."""
    label = f"v3:{name}:f{fraction:g}:d{draw}"
    if label in USER_DATASETS:
        return label
    base = load_dataset(name)
    rng = np.random.default_rng([draw, round(fraction * 1000), zlib.crc32(name.encode())])
    x, y = base.x_train, base.y_train
    if fraction < 1.0:
        keep = stratified_holdout(y, fraction, rng)
        x, y = x[keep], y[keep]
    val = stratified_holdout(y, profile.validation_share, rng)
    fields = dict(name=label, x_train=x[~val], y_train=y[~val], x_val=x[val], y_val=y[val],
                  info=dataclasses.replace(base.info, name=label))
    if tuning:
        fields.update(x_test=np.zeros_like(base.x_test), y_test=np.zeros_like(base.y_test),
                      robust={k: np.zeros_like(v) for k, v in base.robust.items()})
    register_dataset(dataclasses.replace(base, **fields))
    return label


def epochs_for(dataset: str, profile: Profile) -> int:
    """The epoch cap of a data draw: ``epochs`` passes, or more until ``min_steps`` optimizer
    steps, so a small subset is not stopped before it can learn (the best validation epoch is
    kept either way, so extra passes cannot overfit the result)."""
    steps_per_epoch = math.ceil(len(USER_DATASETS[dataset].y_train) / profile.batch_size)
    return max(profile.epochs, math.ceil(profile.min_steps / steps_per_epoch))


def spec(dataset: str, activation: str, arm: str, learning_rate: float, strength, seed: int, profile: Profile):
    kind, scope = {**ARMS, **FIXED_ARMS}[arm]
    regularizer = RegularizerConfig(kind=kind, strength=strength, dreg_scope=scope or "activation", **OPTIONS)
    config = TrainConfig(model=ModelConfig(hidden=profile.hidden, activation=activation), regularizer=regularizer,
                         optimizer=OptimizerConfig(learning_rate=learning_rate), epochs=epochs_for(dataset, profile),
                         batch_size=profile.batch_size)
    return RunSpec(dataset, config, seed=seed)


def has_strength(arm: str, activation: str) -> bool:
    """Whether the arm's strength is tuned: not for none/SN, and not for DREG-act under ReLU
    (sigma'' = 0: the penalty has no gradient, so every strength is the same run; declared a
    forced tie, tuned over the learning rates at the centre strength)."""
    kind, scope = ARMS[arm]
    return kind in CENTRES and not (kind == "dreg" and scope == "activation" and activation == "relu")


@functools.lru_cache(maxsize=4)
def planning_specs(profile: Profile) -> tuple:
    """One run of every structure the study will ask for, on every data draw (tuning round 0
    and the final stage, at placeholder numbers: numbers are traced, edge extensions add
    strengths, not programs). Every ``run_sweep`` call plans its programs for all of them
    (``plan_for``), so each round and stage reuses the same compiled programs."""
    specs = []
    for d in profile.datasets:
        for f in profile.fractions:
            names = [draw_dataset(d, f, TUNING_DRAW, profile, tuning=True)]
            names += [draw_dataset(d, f, seed, profile, tuning=False) for seed in range(profile.final_seeds)]
            for name in names:
                for a in profile.activations:
                    for arm, (kind, _) in {**ARMS, **FIXED_ARMS}.items():
                        strength = CENTRES.get(kind)
                        specs.append(spec(name, a, arm, FIXED_LEARNING_RATE, strength, TUNING_SEED_BASE, profile))
    return tuple(specs)


def engine_options(profile: Profile) -> EngineOptions:
    """Best-epoch restore for every run; one program per (shape bucket, regularizer kind)
    holding every activation, the same in every tuning round and in the final stage (compiled
    once: :func:`planning_specs`)."""
    return EngineOptions(per_epoch_diagnostics=False, restore_best_epoch=True, fold="activations",
                         fold_activations=tuple(profile.activations))


def tuning_stage(profile: Profile, out: pathlib.Path, progress: bool, shapes) -> dict:
    """Stage 1 for the (dataset, fraction) pairs ``shapes``: the picks
    ``{(dataset, fraction, activation, arm): {...}}`` (module docs)."""
    seeds = [TUNING_SEED_BASE + i for i in range(profile.tuning_seeds)]
    cells = [(d, f, a, arm) for d, f in shapes for a in profile.activations for arm in ARMS]
    data = {(d, f): draw_dataset(d, f, TUNING_DRAW, profile, tuning=True) for d, f in shapes}
    strengths = {c: (grid(ARMS[c[3]][0], profile) if has_strength(c[3], c[2])
                     else [CENTRES[ARMS[c[3]][0]]] if ARMS[c[3]][0] in CENTRES else [None]) for c in cells}
    extensions = {c: 0 for c in cells}
    for round_ in range(profile.max_extensions + 1):
        specs, keys = [], []
        for c in cells:
            d, f, a, arm = c
            for s in strengths[c]:
                for lr in profile.learning_rates:
                    for seed in seeds:
                        specs.append(spec(data[(d, f)], a, arm, lr, s, seed, profile))
                        keys.append((c, s, lr))
        print(f"tuning {', '.join(f'{d} {f:g}' for d, f in shapes)}, round {round_}: {len(specs)} runs", flush=True)
        records = run_sweep(specs, out / "tuning.jsonl", progress=progress, report=False, options=engine_options(profile),
                            plan_for=planning_specs(profile))
        accuracy = {c: {} for c in cells}
        for (c, s, lr), r in zip(keys, records):
            value = r["metrics"].get("validation_accuracy") if r["status"] == "ok" else None
            accuracy[c].setdefault((0.0 if s is None else s, lr), []).append(np.nan if value is None else value)
        grown = 0
        for c in cells:
            if round_ < profile.max_extensions and has_strength(c[3], c[2]):
                beyond = edge_extension(accuracy[c], step_decades(profile))
                if beyond is not None:
                    strengths[c] = sorted(strengths[c] + [beyond])
                    extensions[c] += 1
                    grown += 1
        if not grown:
            break
    picks = {}
    for c in cells:
        s, lr = choose(accuracy[c])
        on_edge = has_strength(c[3], c[2]) and edge_extension(accuracy[c], step_decades(profile)) is not None
        picks[c] = {"strength": None if strengths[c] == [None] else s, "learning_rate": lr,
                    "validation_accuracy": float(np.nanmean(accuracy[c][(s, lr)])),
                    "extensions": extensions[c], "on_edge": bool(on_edge), "points": len(strengths[c]),
                    "lr_on_edge": len(profile.learning_rates) > 1 and lr in (min(profile.learning_rates),
                                                                              max(profile.learning_rates))}
    majority = {d: float(np.bincount(USER_DATASETS[data[(d, f)]].y_val).max() / len(USER_DATASETS[data[(d, f)]].y_val))
                for d, f in shapes if f == max(profile.fractions)}
    return {"picks": picks, "majority": majority}


def final_stage(profile: Profile, picks: dict, out: pathlib.Path, progress: bool, shapes) -> list:
    """Stage 2: every arm at its pick, and the fixed-lambda arms, on the fresh seeds. Returns the
    records, each with a ``study`` label (dataset, fraction, activation, arm, seed): a fixed arm
    whose settings equal a tuned pick is the same run (one id), counted under both labels."""
    specs, labels = [], []
    # (dataset, fraction) outermost: the draws of one shape follow each other and reuse the
    # programs compiled for it (the engine keeps a few executables in memory)
    for d, f in shapes:
        for seed in range(profile.final_seeds):
            name = draw_dataset(d, f, seed, profile, tuning=False)
            for a in profile.activations:
                for arm in (*ARMS, *FIXED_ARMS):
                    p = picks.get((d, f, a, arm), {"learning_rate": FIXED_LEARNING_RATE, "strength": LAMBDA})
                    specs.append(spec(name, a, arm, p["learning_rate"], p["strength"], seed, profile))
                    labels.append({"dataset": d, "fraction": f, "activation": a, "arm": arm, "seed": seed})
    print(f"final {', '.join(f'{d} {f:g}' for d, f in shapes)}: {len(specs)} runs on {profile.final_seeds} fresh seeds",
          flush=True)
    records = run_sweep(specs, out / "results.jsonl", progress=progress, report=False, options=engine_options(profile),
                        plan_for=planning_specs(profile))
    return [{**r, "study": label} for r, label in zip(records, labels)]


#: the final metrics the committed compact results keep per run
COMPACT_METRICS = ("test_accuracy", "validation_accuracy", "robust_accuracy", "best_epoch", "train_examples",
                   "validation_rows", "fail_step", "diverge_step")


def compact(records, curves=("validation_accuracy", "test_accuracy")) -> list[dict]:
    """What the report reads, per run (the committed raw results; the full files stay in the run folder)."""
    return compact_records(records, COMPACT_METRICS, curves)


write_compact, read_compact = write_jsonl_gz, read_jsonl_gz  # the committed compact results


def main(argv=None):
    args, out = experiment_args(argv, __doc__, PROFILES, "dreg_study_v3")
    profile = PROFILES[args.profile]
    print(f"DREG study v3, profile {args.profile} -> {out}")
    start = time.perf_counter()
    tuned, records, tuning_seconds = {"picks": {}, "majority": {}}, [], 0.0
    # one (dataset, fraction) at a time, tuning then final: its programs (one per regularizer
    # kind) are compiled once and serve every round and every seed
    for d in profile.datasets:
        for f in profile.fractions:
            t0 = time.perf_counter()
            part = tuning_stage(profile, out, not args.no_progress, [(d, f)])
            tuning_seconds += time.perf_counter() - t0
            tuned["picks"].update(part["picks"])
            tuned["majority"].update(part["majority"])
            records += final_stage(profile, part["picks"], out, not args.no_progress, [(d, f)])
    wall = time.perf_counter() - start
    from dreg_jax.analysis.results import load_records

    write_compact(out / "tuning.jsonl.gz", compact(load_records(out / "tuning.jsonl"), curves=()))
    write_compact(out / "results.jsonl.gz", compact(records))
    from dreg_jax.engine.grid import PROCESS_STATS

    meta = write_meta(
        out, "dreg_study_v3", args.profile, design=dataclasses.asdict(profile), messy=list(MESSY),
        picks=[{"dataset": d, "fraction": f, "activation": a, "arm": arm, **p}
               for (d, f, a, arm), p in tuned["picks"].items()],
        majority=tuned["majority"], preregistration_commit=preregistration_commit(), deviations=DEVIATIONS,
        wall_seconds=round(wall, 1), tuning_seconds=round(tuning_seconds, 1),
        compiled_programs=PROCESS_STATS.programs, compile_seconds=round(PROCESS_STATS.compile_seconds, 1),
        run_seconds=round(PROCESS_STATS.run_seconds, 1),
        tuning_runs=sum(1 for _ in open(out / "tuning.jsonl")), final_runs=len(records))
    from dreg_study_v3_analysis import write_report

    print(write_report(read_compact(out / "results.jsonl.gz"), out, meta))
    print(f"\nwrote {out / 'report.md'}; {meta['tuning_runs']} tuning + {len(records)} final runs in {wall:.0f}s")
    print(compile_summary())


def rebuild_report(out, meta) -> str:
    """The report from the committed compact results and ``meta.json`` (experiments/rebuild_report.py)."""
    from dreg_study_v3_analysis import write_report

    return write_report(read_compact(pathlib.Path(out) / "results.jsonl.gz"), pathlib.Path(out), meta)


if __name__ == "__main__":
    main()
