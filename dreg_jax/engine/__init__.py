"""Training engine: whole runs as one compiled program, vmapped, sharded, resumable sweeps.

``train_many`` and the run pieces need the core install only; sweeps (``run_sweep``,
``SweepConfig``, the results store, ``engine_data`` for built-in datasets) need the study extra
and are imported when first used.
"""
from dreg_jax.engine.diagnostics import (
    TAU_VARIANTS,
    gradient_tail_ratio,
    per_example_grad_norms,
    tail_ratio,
    volatility,
)
from dreg_jax.engine.distributed import initialize as initialize_distributed
from dreg_jax.engine.grid import CompileStats, enable_compilation_cache, run_mesh, train_many
from dreg_jax.engine.grouping import BACKEND_COSTS, FOLD_MODES, plan_folds
from dreg_jax.engine.identity import model_identity
from dreg_jax.engine.run import (
    EngineData,
    EngineOptions,
    RunHParams,
    run_keys,
    train_run,
    training_mask,
)

# the sweep layer: run specs (specs.py), the results store (store.py), SweepConfig
# (sweep_config.py), planning and run_sweep (sweep.py)
_SWEEP_NAMES = ("ResultsFile", "RunSpec", "SweepConfig", "plan_programs", "run_sweep", "shard_specs", "summary_table",
                "engine_data", "dataset_engine_data", "load_records")


def __getattr__(name):  # the sweep layer (tqdm, datasets) loads on first use: the study extra
    if name in _SWEEP_NAMES:
        from dreg_jax._extras import require_study_extra

        require_study_extra(f"dreg_jax.engine.{name} (sweeps over datasets)")
        from dreg_jax.engine import sweep
        from dreg_jax.engine.store import load_records  # noqa: F401 (a reader: never writes)

        return load_records if name == "load_records" else getattr(sweep, name)
    raise AttributeError(f"module 'dreg_jax.engine' has no attribute {name!r}")


__all__ = ["TAU_VARIANTS", "gradient_tail_ratio", "per_example_grad_norms", "tail_ratio", "volatility",
           "initialize_distributed", "CompileStats", "enable_compilation_cache", "run_mesh", "train_many", "BACKEND_COSTS", "FOLD_MODES",
           "plan_folds", "model_identity", "EngineData", "EngineOptions", "RunHParams", "run_keys", "train_run",
           "training_mask", *_SWEEP_NAMES]
