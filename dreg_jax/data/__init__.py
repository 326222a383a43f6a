"""Datasets: offline TFDS builders, public TFDS names, messy transforms, your own tables
(scarcity masks live with the runs that draw them: :mod:`dreg_jax.engine.scarcity`)."""
from dreg_jax._extras import require_study_extra

require_study_extra("dreg_jax.data (datasets, engine sweeps, the CLI and the studies)")
from dreg_jax.data.registry import (
    DATASETS,
    OFFLINE,
    PUBLIC,
    STUDY_DATASETS,
    Dataset,
    DatasetInfo,
    DatasetUnavailableError,
    check_dataset,
    load_dataset,
)
from dreg_jax.data.user import from_arrays, from_csv, register_dataset
