"""Classical baselines tuned on the training split only (scikit-learn SVM, XGBoost, logistic
regression), for the ChainzRule comparisons.

Tuning: a small documented grid searched by stratified k-fold cross-validation *inside the
training subset* (k = min(3, smallest class count); with fewer than 2 examples in some class
the defaults are used untuned). The test split is never seen during tuning.

* SVM: ``SVC(kernel="rbf")``, C in {0.1, 1, 10}, gamma in {"scale", 0.01, 0.1}.
* XGBoost: ``XGBClassifier``, max_depth in {2, 3, 4}, n_estimators in {50, 150},
  learning_rate 0.1 (the ``baselines`` extra). Without xgboost installed, scikit-learn's
  ``HistGradientBoostingClassifier`` (max_depth in {2, 3, 4}, max_iter in {50, 150}) is used
  and reported under the name ``GBDT (sklearn)``, never as XGBoost.
* Logistic regression: C in {0.01, 0.1, 1, 10}, max_iter 2000.
"""
from __future__ import annotations

import numpy as np

SVM_GRID = {"C": [0.1, 1.0, 10.0], "gamma": ["scale", 0.01, 0.1]}
BOOST_GRID = {"max_depth": [2, 3, 4], "n_estimators": [50, 150]}
HGB_GRID = {"max_depth": [2, 3, 4], "max_iter": [50, 150]}
LOGREG_GRID = {"C": [0.01, 0.1, 1.0, 10.0]}


def xgboost_available() -> bool:
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return False
    return True


def boosting_name() -> str:
    return "XGBoost" if xgboost_available() else "GBDT (sklearn)"


def _estimator(name: str, seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    if name == "svm":
        return SVC(kernel="rbf"), SVM_GRID
    if name == "logreg":
        return LogisticRegression(max_iter=2000), LOGREG_GRID
    if name == "boosting":
        if xgboost_available():
            from xgboost import XGBClassifier

            return XGBClassifier(learning_rate=0.1, random_state=seed, n_jobs=1, verbosity=0), BOOST_GRID
        return HistGradientBoostingClassifier(learning_rate=0.1, random_state=seed), HGB_GRID
    raise ValueError(f"unknown classical model {name!r}; expected one of: svm, boosting, logreg")


def fit_and_score(name: str, x_train, y_train, x_test, y_test, seed: int = 0) -> float:
    """Test accuracy of the model tuned by CV on ``(x_train, y_train)`` only."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    estimator, grid = _estimator(name, seed)
    counts = np.bincount(y_train)
    counts = counts[counts > 0]
    if len(counts) < 2:  # a single class in the subset: predict it
        return float(np.mean(y_test == np.unique(y_train)[0]))
    folds = int(min(3, counts.min()))
    if folds >= 2:
        search = GridSearchCV(estimator, grid, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
        model = search.fit(x_train, y_train).best_estimator_
    else:
        model = estimator.fit(x_train, y_train)
    return float(np.mean(model.predict(x_test) == y_test))


def classical_scores(models: dict, datasets, fractions, seeds: int, cache_path, progress: bool = True,
                     featurizer: str = "hashed", validation_fraction: float = 0.0, cached_only: bool = False) -> dict:
    """Test accuracy of each classical model on every (dataset, fraction, seed) subset.

    Args:
      models: report name -> ``"svm"`` / ``"boosting"`` / ``"logreg"``.
      datasets, fractions, seeds: the grid; subsets are ``dreg_jax.engine.training_mask``'s,
        the same the neural runs of that seed and fraction use.
      cache_path: JSON file of finished scores (resumable).
      featurizer: text features (``"hashed"`` or ``"minilm"``), part of the cache key.
      validation_fraction: the share of the training split held out as the neural runs'
        validation split (the same rows, :func:`dreg_jax.data.carve_validation`), so both see
        the same training rows; part of the cache key.
      cached_only: read the cache and never train (a report rebuild): a missing score is an
        error, whatever models are installed.

    Returns:
      ``{(dataset, fraction, name, seed): accuracy}``.
    """
    import json
    import pathlib

    from tqdm.auto import tqdm

    from dreg_jax.data import load_dataset
    from dreg_jax.engine import training_mask

    cache_path = pathlib.Path(cache_path)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    jobs = [(d, f, s, name) for d in datasets for f in fractions for s in range(seeds) for name in models]
    out = {}
    for d, f, s, name in tqdm(jobs, desc=", ".join(models), disable=not progress):
        key = (f"{d}|{f}|{s}|{name}" + ("" if featurizer == "hashed" else f"|{featurizer}")
               + (f"|val{validation_fraction:g}" if validation_fraction else ""))
        if key not in cache and cached_only:
            raise SystemExit(f"{cache_path} has no score for {key}: a rebuild reads the cached classical scores "
                             "and never trains; run the study itself to compute them")
        if key not in cache:
            ds = load_dataset(d, featurizer=featurizer, validation_fraction=validation_fraction)
            mask = training_mask(s, ds.y_train, f, ds.num_classes)
            cache[key] = fit_and_score(models[name], ds.x_train[mask], ds.y_train[mask], ds.x_test, ds.y_test, s)
            cache_path.write_text(json.dumps(cache))
        out[(d, f, name, s)] = cache[key]
    return out
