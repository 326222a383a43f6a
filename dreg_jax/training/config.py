"""Run configuration as plain frozen dataclasses (hashable: usable as static jit arguments).

Structural choices (names, widths, scope) live here; the numeric hyperparameters that may be
vmapped (learning rate, regularization strength) are copied into the train state as arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from dreg_jax._checks import check_choice, check_finite_scalar, check_positive_int
from dreg_jax.layers.activations import check_activation
from dreg_jax.layers.chainzrule import INITS
from dreg_jax.layers.nnx_model import NNXModel
from dreg_jax.penalties.dreg import (
    DEFAULT_SCOPE,
    LAYER_ESTIMATORS,
    SCALINGS,
    SCOPES,
)
from dreg_jax.penalties.schedules import DEFAULT_WARMUP_FRACTION, NOISE_REPRESENTATIONS, SCHEDULES
from dreg_jax.training.regularizers import DEFAULT_STRENGTHS, REGULARIZERS, WEIGHT_DECAY_READINGS, get_regularizer
from dreg_jax.training.tasks import TASKS

CUSTOM_ACTIVATION = "custom"  # ModelConfig.activation of a user module

# The regularizer kinds, their labels and default strengths live in one place:
# dreg_jax.training.regularizers.REGISTRY (DEFAULT_STRENGTHS and REGULARIZERS derive from it).


#: TrainConfig.class_weight choices.
CLASS_WEIGHTS = ("none", "balanced")

#: RegularizerConfig fields whose default changed: the value a stored config without the field
#: meant (results and model.json files written before the change).
LEGACY_REGULARIZER_DEFAULTS = {"weight_decay_reading": "times_lr"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The built-in MLP (``hidden``, ``activation``, ...) or your own linen ``module``.

    ``module``: an unbound linen module, or ``dreg_jax.NNXModel(factory)`` for an NNX module,
    mapping ``(batch, features)`` float inputs to ``(batch, num_classes)`` logits (reshape
    inside it for images); the engine calls ``module.apply(variables, x)``. DREG on it goes through :func:`dreg_jax.jacobian_terms`:
    ``dreg_scope="activation"`` penalizes its marked activations (``dreg_jax.Activation``,
    ``ChainzRule``), ``dreg_scope="layer"`` the submodules named in ``jacobian_layers``
    (paths as in its params tree). ``hidden`` and the ChainzRule fields are then unused and
    ``activation`` is ``"custom"``.
    """

    hidden: tuple[int, ...] = (64, 64, 64)
    activation: str = "gelu"
    chainzrule_per_feature: bool = True
    chainzrule_init: str = "gelu"
    chainzrule_input_bound: float | None = 4.0
    dtype: str = "float32"
    module: Any = None
    jacobian_layers: tuple[str, ...] = ()

    @property
    def is_custom(self) -> bool:
        return self.module is not None

    def validate(self):
        if self.module is not None:
            import flax.linen as nn


            if isinstance(self.module, NNXModel):
                pass
            elif not isinstance(self.module, nn.Module) or self.module.scope is not None:
                raise TypeError(f"ModelConfig.module must be an unbound flax.linen module or "
                                f"dreg_jax.NNXModel(factory), got {type(self.module).__name__}")
            if self.activation != CUSTOM_ACTIVATION:
                raise ValueError(f"with your own module, activation must be {CUSTOM_ACTIVATION!r} "
                                 f"(got {self.activation!r}): the module defines its activations")
            if isinstance(self.jacobian_layers, str) or not all(isinstance(p, str) and p for p in self.jacobian_layers):
                raise ValueError(f"jacobian_layers must be a tuple of submodule paths, got {self.jacobian_layers!r}")
            return self
        if self.jacobian_layers:
            raise ValueError("jacobian_layers selects submodules of your own module; the built-in MLP "
                             "penalizes its hidden layers")
        check_activation(self.activation)
        check_choice("chainzrule_init", self.chainzrule_init, INITS)
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float64"))
        if not self.hidden or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in self.hidden):
            raise ValueError(f"hidden must be non-empty positive integer widths, got {self.hidden}")
        return self


@dataclasses.dataclass(frozen=True)
class RegularizerConfig:
    kind: str = "none"
    strength: float | None = None  # None: DEFAULT_STRENGTHS[kind]
    dreg_scope: str = DEFAULT_SCOPE
    dreg_scaling: str = "none"  # see dreg_jax.penalties.dreg for why
    layer_estimator: str = "probe"  # for dreg_scope="layer": "probe" or "exact"
    num_probes: int = 1
    # lambda_t = strength * m_t for DREG; formulas in dreg_jax.penalties.schedules
    strength_schedule: str = "constant"
    warmup_fraction: float = DEFAULT_WARMUP_FRACTION
    noise_representation: str = "penultimate"
    coherent_l1: float = 0.0
    coherent_decay: float = 0.9
    coherent_threshold: float = 0.5
    # weight decay, decoupled (AdamW) in every reading (dreg_jax.training.regularizers.decay_per_step):
    # "per_step" (the default; Loshchilov & Hutter 2019, Alg. 2 with schedule multiplier 1:
    # theta -= strength * theta every step, not multiplied by the learning rate), "times_lr"
    # (optax/PyTorch AdamW: theta -= lr * strength * theta; at the default strength 1e-4 and a
    # learning rate of 1e-3 that is 1e-7 per step, which does not act: the default before
    # 2026-12, kept for old results) or "normalized" (strength / sqrt(total steps) per step)
    weight_decay_reading: str = "per_step"
    # spectral norm: also normalize the output (classifier) layer, as Miyato et al. do for
    # discriminators; False keeps the logits' scale free (hidden layers only)
    spectral_norm_head: bool = True
    # DREG, dreg_scope="layer": also penalize the output layer's map, ||W_out||_F^2 (exact;
    # the head is linear so its Jacobian is the kernel for every input)
    dreg_output_layer: bool = False

    def validate(self):
        get_regularizer(self.kind)
        check_choice("dreg_scope", self.dreg_scope, SCOPES)
        check_choice("dreg_scaling", self.dreg_scaling, SCALINGS)
        check_choice("layer_estimator", self.layer_estimator, LAYER_ESTIMATORS)
        check_choice("strength_schedule", self.strength_schedule, SCHEDULES)
        check_choice("noise_representation", self.noise_representation, NOISE_REPRESENTATIONS)
        check_choice("weight_decay_reading", self.weight_decay_reading, WEIGHT_DECAY_READINGS)
        if self.dreg_output_layer and self.dreg_scope != "layer":
            raise ValueError("dreg_output_layer=True penalizes the output layer's map, which only the layer "
                             "scope has (the head has no activation): set dreg_scope='layer'")
        if self.strength_schedule != "constant" and not get_regularizer(self.kind).schedulable:
            raise ValueError(
                f"strength_schedule={self.strength_schedule!r} applies to the DREG penalty only; "
                f"use strength_schedule='constant' with regularizer {self.kind!r}"
            )
        if not 0.0 < self.warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction must be in (0, 1], got {self.warmup_fraction}")
        check_positive_int(self.num_probes, "num_probes")
        if self.strength is not None:
            check_finite_scalar(self.strength, "strength", minimum=0.0)
        return self

    def resolved_strength(self) -> float:
        if self.strength is not None:
            return float(self.strength)
        default = get_regularizer(self.kind).default_strength
        return 0.0 if default is None else float(default)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-3  # Adam

    def validate(self):
        check_finite_scalar(self.learning_rate, "learning_rate", minimum=0.0, strict=True)
        return self


@dataclasses.dataclass(frozen=True)
class Fold:
    """Per-run choices compiled into one program (the engine's run axis; see
    :mod:`dreg_jax.engine.grouping`).

    A run picks its activation by ``RunHParams.activation_index`` into ``activations`` and its
    regularizer by ``RunHParams.regularizer_index`` into ``regularizers``; they replace
    ``ModelConfig.activation`` and ``RegularizerConfig.kind`` of the program's config. Empty:
    not folded (the config's own choice).
    """

    activations: tuple[str, ...] = ()
    regularizers: tuple[str, ...] = ()

    def validate(self, config: "TrainConfig"):
        for name in self.activations:
            check_activation(name)
        if self.activations and config.model.is_custom:
            raise ValueError("a user module defines its own activations: fold regularizers only")
        for name in self.regularizers:
            reg = get_regularizer(name)
            if len(self.regularizers) > 1 and not reg.foldable:
                raise ValueError(f"regularizer {name!r} changes the model or the optimizer state: "
                                 "it cannot share a program with other regularizers")
        if len(set(self.activations)) != len(self.activations) or len(set(self.regularizers)) != len(self.regularizers):
            raise ValueError(f"a fold lists each choice once, got {self}")
        return self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = ModelConfig()
    regularizer: RegularizerConfig = RegularizerConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    epochs: int = 20
    batch_size: int = 64
    fold: Fold | None = None  # set by the engine for programs that hold several configs
    # "balanced": the data loss weights each example by n / (C n_c) of its class (C classes
    # present, n_c training rows of class c; sklearn's "balanced"), normalized per batch:
    # sum_b w_b CE_b / sum_b w_b. "none": the plain mean. Metrics are never weighted.
    class_weight: str = "none"
    # "classification" (logits, cross-entropy, accuracy) or "regression" (one output, squared
    # error on the standardized target, R^2): dreg_jax.training.tasks
    task: str = "classification"

    @property
    def activations(self) -> tuple[str, ...]:
        """The activations a program built from this config holds (one unless folded)."""
        return self.fold.activations if self.fold and self.fold.activations else (self.model.activation,)

    @property
    def regularizers(self) -> tuple[str, ...]:
        """The regularizer kinds a program built from this config holds (one unless folded)."""
        return self.fold.regularizers if self.fold and self.fold.regularizers else (self.regularizer.kind,)

    @classmethod
    def from_dict(cls, c: dict) -> "TrainConfig":
        """The config of ``dataclasses.asdict(config)`` (JSON round trip: lists back to tuples).
        A user module recorded by its identity string stays that string (pass the module to use
        it). A fold is a program's, never a run's, and is not read back."""
        model = c["model"]
        return cls(
            model=ModelConfig(**{**model, "hidden": tuple(model["hidden"]),
                                 "jacobian_layers": tuple(model.get("jacobian_layers", ()))}),
            # a config stored before a field existed meant that field's legacy default
            regularizer=RegularizerConfig(**{**LEGACY_REGULARIZER_DEFAULTS, **c["regularizer"]}),
            optimizer=OptimizerConfig(**c["optimizer"]),
            epochs=c["epochs"], batch_size=c["batch_size"], class_weight=c.get("class_weight", "none"),
            task=c.get("task", "classification"),
        )

    def validate(self):
        check_choice("class_weight", self.class_weight, CLASS_WEIGHTS)
        check_choice("task", self.task, TASKS)
        if self.task == "regression":
            if self.class_weight != "none":
                raise ValueError(f"class_weight={self.class_weight!r} weighs classes, and a regression target has "
                                 "none: leave it at 'none'")
            if self.regularizer.strength_schedule == "noise_inverse":
                raise ValueError("strength_schedule='noise_inverse' reads the class structure of the representation; "
                                 "a regression run takes another schedule (constant, linear_warmup, cosine_decay)")
        self.model.validate()
        self.regularizer.validate()
        self.optimizer.validate()
        if self.fold is not None:
            self.fold.validate(self)
        reg = self.regularizer
        if self.model.is_custom:
            if get_regularizer(reg.kind).spectral_norm:
                raise ValueError("spectral_norm wraps the built-in MLP's Dense layers; for your own module "
                                 "wrap its layers in flax.linen.SpectralNorm and use regularizer 'none'")
            get_regularizer(reg.kind).check_user_model(self)
            if reg.dreg_output_layer:
                raise ValueError("dreg_output_layer applies to the built-in MLP; on your own module name the "
                                 "output submodule in ModelConfig.jacobian_layers instead")
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        return self
