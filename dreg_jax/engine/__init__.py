"""Training engine: whole runs as one compiled program, vmapped, sharded, resumable sweeps."""
from dreg_jax.engine.diagnostics import (
    TAU_VARIANTS,
    gradient_tail_ratio,
    per_example_grad_norms,
    tail_ratio,
    volatility,
)
from dreg_jax.engine.grid import CompileStats, enable_compilation_cache, run_mesh, train_many
from dreg_jax.engine.grouping import BACKEND_COSTS, FOLD_MODES, plan_folds
from dreg_jax.engine.run import (
    EngineData,
    EngineOptions,
    RunHParams,
    run_keys,
    train_run,
    training_mask,
)
from dreg_jax.engine.sweep import ResultsFile, RunSpec, SweepConfig, plan_programs, run_sweep, summary_table
