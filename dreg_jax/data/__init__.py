"""Datasets: registry, offline loaders, scarcity masks and noise."""
from dreg_jax.data.registry import DATASETS, Dataset, check_dataset, load_dataset
from dreg_jax.data.scarcity import stratified_fraction_mask, symmetric_label_noise
from dreg_jax.data.sklearn_sets import SKLEARN_DATASETS, Split, load_sklearn_dataset
