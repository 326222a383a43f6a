"""Datasets."""
from dreg_jax.data.sklearn_sets import SKLEARN_DATASETS, Split, load_sklearn_dataset
