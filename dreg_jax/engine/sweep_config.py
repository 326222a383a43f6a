"""``SweepConfig``: a grid of runs from Python or a YAML file (numbers, names and options checked
before anything compiles, with a did-you-mean).
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
from typing import Any

import numpy as np

from dreg_jax.engine.specs import RunSpec
from dreg_jax.training.regularizers import get_regularizer
from dreg_jax.training.config import (
    CUSTOM_ACTIVATION,
    REGULARIZERS,
    ModelConfig,
    OptimizerConfig,
    RegularizerConfig,
    TrainConfig,
)

_NAME_LISTS = ("datasets", "activations", "regularizers", "strength_schedules", "dreg_scope")
_NUMBER_LISTS = ("fractions", "label_noise", "input_noise", "learning_rates")
_POSITIVE_INTS = ("epochs", "batch_size")
_NAMES = ("featurizer", "task")
_FRACTIONS = ("validation_fraction",)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _coerce_field(key, value):
    """Checks a sweep key's value type (lists where lists are expected); returns it as a tuple."""
    as_list = list(value) if isinstance(value, (list, tuple)) else [value]
    if key in _NAME_LISTS:
        if not as_list or not all(isinstance(v, str) for v in as_list):
            raise ValueError(f"{key} must be a name or a list of names, got {value!r}")
        return tuple(as_list)
    if key in _NUMBER_LISTS:
        if not as_list or not all(_is_number(v) and math.isfinite(v) for v in as_list):
            raise ValueError(f"{key} must be a finite number or a list of them, got {value!r}")
        return tuple(float(v) for v in as_list)
    if key == "seeds":
        if _is_int(value) and value >= 1:
            return int(value)
        if isinstance(value, (list, tuple)) and value and all(_is_int(v) and 0 <= v < 2**32 for v in value):
            return tuple(int(v) for v in value)
        raise ValueError(f"seeds must be a positive count (0..n-1) or a list of integer seeds, got {value!r}")
    if key == "hidden":
        if not as_list or not all(_is_int(v) and v >= 1 for v in as_list):
            raise ValueError(f"hidden must be a list of positive integer widths, got {value!r}")
        return tuple(int(v) for v in as_list)
    if key in _POSITIVE_INTS:
        if not (_is_int(value) and value >= 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
        return int(value)
    if key in _FRACTIONS:
        if not (_is_number(value) and 0 <= value < 1):
            raise ValueError(f"{key} must be a number in [0, 1), got {value!r}")
        return float(value)
    if key in ("module", "jacobian_layers"):
        raise ValueError(f"{key} can only be given from Python (SweepConfig(module=..., jacobian_layers=...))")
    if key in _NAMES:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a name, got {value!r}")
        return value
    if key == "strengths":
        if not isinstance(value, dict):
            raise ValueError(f"strengths must map regularizer names to strengths, got {value!r}")
        out = {}
        for name, v in value.items():
            vs = list(v) if isinstance(v, (list, tuple)) else [v]
            if not vs or not all(_is_number(x) and math.isfinite(x) and x >= 0 for x in vs):
                raise ValueError(f"strengths[{name!r}] must be a finite number >= 0 or a list of them, got {v!r}")
            out[name] = [float(x) for x in vs] if isinstance(v, (list, tuple)) else float(v)
        return out
    if key in ("regularizer_options", "model_options"):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must map config fields to values, got {value!r}")
        return dict(value)
    return value


def _options(key: str, options: dict, config_class, fixed: set) -> dict:
    """``SweepConfig.regularizer_options`` / ``model_options`` checked against the config's fields."""
    valid = {f.name for f in dataclasses.fields(config_class)} - fixed
    for name in options:
        if name in fixed:
            raise ValueError(f"{key} cannot set {name!r}: the sweep's own key sets it")
        if name not in valid:
            hint = difflib.get_close_matches(name, valid, 1)
            raise ValueError(f"{key} has unknown field {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                             + f"; valid: {', '.join(sorted(valid))}")
    return dict(options)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A factorial grid, as written in a YAML/JSON sweep file (keys = field names)."""

    datasets: tuple[str, ...] = ("digits",)
    activations: tuple[str, ...] = ("gelu",)
    regularizers: tuple[str, ...] = ("none", "dreg")
    seeds: int | tuple[int, ...] = 3  # a count (0..n-1) or an explicit list
    fractions: tuple[float, ...] = (1.0,)
    label_noise: tuple[float, ...] = (0.0,)
    input_noise: tuple[float, ...] = (0.0,)
    learning_rates: tuple[float, ...] = (1e-3,)
    strengths: dict = dataclasses.field(default_factory=dict)  # regularizer -> strength (lists ok)
    hidden: tuple[int, ...] = (64, 64, 64)
    epochs: int = 20
    batch_size: int = 64
    # DREG's reading: "activation" or "layer", or a list of both: one DREG arm per scope (the
    # other regularizers' runs take the first)
    dreg_scope: str | tuple[str, ...] = "activation"
    # further RegularizerConfig fields for every run, e.g. {"layer_estimator": "exact",
    # "weight_decay_reading": "per_step", "spectral_norm_head": False}
    regularizer_options: dict = dataclasses.field(default_factory=dict)
    # further ModelConfig fields for every run, e.g. {"chainzrule_input_bound": None} (no clip)
    model_options: dict = dataclasses.field(default_factory=dict)
    featurizer: str = "hashed"  # text datasets: "hashed" or "minilm"
    validation_fraction: float = 0.0  # built-in sets: stratified training share held out (0: none)
    strength_schedules: tuple[str, ...] = ("constant",)  # DREG runs only; see penalties.schedules
    module: Any = None  # your own linen module (Python only; see ModelConfig.module)
    jacobian_layers: tuple[str, ...] = ()  # its submodules for dreg_scope="layer"
    class_weight: str = "none"  # "balanced": the data loss weighted n / (C n_c) per class (TrainConfig)
    task: str = "classification"  # or "regression" (your own table's numeric target; TrainConfig.task)

    @classmethod
    def from_mapping(cls, mapping: dict) -> "SweepConfig":
        """A config from a YAML/JSON mapping, every value type-checked (one-line errors)."""
        if not isinstance(mapping, dict):
            raise ValueError(f"a sweep config is a mapping of keys, got {type(mapping).__name__}")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - valid)
        if unknown:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, 1)) else repr(k)
                     for k in unknown]
            raise ValueError(f"unknown sweep key(s) {unknown}; valid keys: {', '.join(sorted(valid))}"
                             + (f"; {', '.join(h for h in hints if 'did you mean' in h)}" if any('did you mean' in h for h in hints) else ""))
        return cls(**{k: _coerce_field(k, v) for k, v in mapping.items()})

    def expand(self) -> list[RunSpec]:
        for kind in self.strengths:
            if kind not in REGULARIZERS:
                raise ValueError(f"strengths has unknown regularizer {kind!r}; expected one of: {', '.join(REGULARIZERS)}")
        if set(self.strength_schedules) != {"constant"} and not any(
                get_regularizer(r).schedulable for r in self.regularizers):
            raise ValueError(f"strength_schedules {list(self.strength_schedules)} apply to the dreg regularizer "
                             f"only; add dreg to regularizers (got {list(self.regularizers)})")
        seeds = range(self.seeds) if isinstance(self.seeds, int) else self.seeds
        activations = (CUSTOM_ACTIVATION,) if self.module is not None else self.activations
        scopes = (self.dreg_scope,) if isinstance(self.dreg_scope, str) else tuple(self.dreg_scope)
        if not scopes:
            raise ValueError("dreg_scope must name a scope (activation, layer) or a list of them")
        options = _options("regularizer_options", self.regularizer_options, RegularizerConfig,
                           {"kind", "strength", "dreg_scope", "strength_schedule"})
        model_options = _options("model_options", self.model_options, ModelConfig,
                                 {"hidden", "activation", "module", "jacobian_layers"})
        specs = []
        for ds, act, reg, lr in itertools.product(self.datasets, activations, self.regularizers,
                                                  self.learning_rates):
            strengths = self.strengths.get(reg, None)
            strengths = strengths if isinstance(strengths, (list, tuple)) else [strengths]
            schedulable = get_regularizer(reg).schedulable  # several readings and lambda_t schedules
            schedules = self.strength_schedules if schedulable else ("constant",)
            for scope, strength, schedule, seed, frac, ln, inoise in itertools.product(
                scopes if schedulable else scopes[:1], strengths, schedules, seeds, self.fractions,
                self.label_noise, self.input_noise
            ):
                config = TrainConfig(
                    model=ModelConfig(hidden=tuple(self.hidden), activation=act, module=self.module,
                                      jacobian_layers=tuple(self.jacobian_layers), **model_options),
                    regularizer=RegularizerConfig(kind=reg, strength=strength, dreg_scope=scope,
                                                  strength_schedule=schedule, **options),
                    optimizer=OptimizerConfig(learning_rate=lr),
                    epochs=self.epochs, batch_size=self.batch_size, class_weight=self.class_weight, task=self.task,
                )
                specs.append(RunSpec(ds, config, int(seed), float(frac), float(ln), float(inoise), self.featurizer,
                                     float(self.validation_fraction)))
        return [s.validate() for s in specs]
