r"""Regularizers as objects: one :class:`Regularizer` per kind, read by the whole project.

A regularizer says its name, its short label (reports, plots), its default strength with the
source of that default, and how it changes the three places a regularizer can act:

* the model (``spectral_norm`` wraps every Dense in ``flax.linen.SpectralNorm``);
* the optimizer (``weight_decay`` is AdamW's decoupled decay, ``coherent`` adds
  gradient-coherent strong L2/L1 before Adam);
* the loss (``dreg``, ``igpen``, ``jacobian`` add a penalty to the data loss).

The MLP builder, :func:`dreg_jax.training.train_step`, the engine, the CLI and the studies all
read :data:`REGISTRY`, so a new baseline is one :class:`Regularizer` added here. The coefficient
is called ``strength`` everywhere in the code (``RegularizerConfig.strength``,
``RunHParams.strength``, ``TrainState.strength``, the penalties' ``strength=`` argument); the
docs write it :math:`\lambda`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dreg_jax._checks import check_choice
from dreg_jax.layers.jacobian_terms import jacobian_terms
from dreg_jax.layers.mlp import MLP
from dreg_jax.penalties.coherent import coherent_strong_regularization
from dreg_jax.penalties.dreg import DEFAULT_LAMBDA, dreg_penalty
from dreg_jax.penalties.input_gradient import DEFAULT_IGPEN_LAMBDA, input_gradient_penalty
from dreg_jax.penalties.network_jacobian import DEFAULT_JACOBIAN_LAMBDA, network_jacobian_penalty
from dreg_jax.penalties.schedules import representation_noise_ratio, strength_multiplier
from dreg_jax.training.tasks import per_example_loss
from dreg_jax.training.user_model import UserModel, dropout_key


class LossTerms(NamedTuple):
    """What a regularizer's loss hook returns."""

    logits: jax.Array
    data_loss: jax.Array
    penalty: jax.Array
    batch_stats_updates: dict
    metrics: dict


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def mean_data_loss(outputs, ctx):
    """The data loss (:func:`dreg_jax.training.tasks.per_example_loss` of the config's task:
    cross-entropy, or the squared error of a regression): its batch mean, or with per-example
    ``ctx.weights`` (``TrainConfig.class_weight``) the weighted mean
    :math:`\\sum_b w_b \\ell_b / \\sum_b w_b`."""
    losses = per_example_loss(outputs, ctx.y, ctx.config.task)
    if ctx.weights is None:
        return jnp.mean(losses)
    return jnp.sum(ctx.weights * losses) / jnp.maximum(jnp.sum(ctx.weights), 1e-12)


def _model_pass_options(reg) -> dict:
    """The built-in MLP pass every loss of a config uses (DREG's terms come from it when they
    can, so a folded program runs one pass for the plain and the DREG runs; unused terms are
    dead code)."""
    if reg.dreg_scope == "layer" and reg.layer_estimator == "exact":
        return {"jacobian_scope": "layer", "layer_estimator": "exact", "include_output": reg.dreg_output_layer}
    return {"jacobian_scope": "activation"}


def shares_model_pass(kind: str, config) -> bool:
    """Whether ``kind``'s loss is the model's own pass (plus, for DREG, the terms it yields)."""
    if get_regularizer(kind).loss is _plain_loss:
        return True
    reg = config.regularizer
    return (get_regularizer(kind).loss is _dreg_loss and not config.model.is_custom
            and reg.strength_schedule == "constant"
            and (reg.dreg_scope == "activation" or reg.layer_estimator == "exact"))


def _plain_loss(ctx) -> LossTerms:
    if ctx.config.model.is_custom:
        logits, updates = ctx.apply(ctx.x)
    else:  # the MLP's pass with terms (unused here), the same arithmetic as the DREG runs'

        (logits, _), updates = ctx.apply(ctx.x, update_stats=True, method=MLP.forward_with_jacobian_terms,
                                         **_model_pass_options(ctx.config.regularizer))
    return LossTerms(logits, mean_data_loss(logits, ctx), jnp.zeros([], jnp.float32), updates, {})


def custom_model_terms(ctx, scope, estimator, num_probes):
    """``(logits, sq_norms, widths, updates)`` of a user module through ``jacobian_terms``."""


    model = ctx.config.model
    layers = model.jacobian_layers if scope == "layer" else None
    module, variables, kwargs, split = UserModel(model.module).terms_call(ctx.variables, True, dropout_key(ctx.key))
    out, terms, widths = jacobian_terms(module, variables, ctx.x, key=ctx.key, layers=layers, scope=scope,
                                        estimator=estimator, num_probes=num_probes, with_widths=True, **kwargs)
    logits, updates = split(out)
    widths = list(widths.values()) if ctx.config.regularizer.dreg_scaling == "width" else [1] * len(terms)
    return logits, jnp.stack(list(terms.values())), widths, updates


def _dreg_loss(ctx) -> LossTerms:

    reg, state = ctx.config.regularizer, ctx.state
    if ctx.config.model.is_custom:
        logits, sq_norms, widths, updates = custom_model_terms(ctx, reg.dreg_scope, reg.layer_estimator,
                                                               reg.num_probes)
        h = None
    else:
        (logits, sq_norms, h), updates = ctx.apply(
            ctx.x, ctx.key, jacobian_scope=reg.dreg_scope, num_probes=reg.num_probes,
            layer_estimator=reg.layer_estimator, update_stats=True, return_representation=True,
            include_output=reg.dreg_output_layer, method=MLP.forward_with_jacobian_terms,
        )
        widths = tuple(ctx.config.model.hidden) + ((logits.shape[-1],) if reg.dreg_output_layer else ())
    metrics = {}
    noise_ratio = None
    if reg.strength_schedule == "noise_inverse":
        rep = h if reg.noise_representation == "penultimate" else ctx.x
        noise_ratio = representation_noise_ratio(jax.lax.stop_gradient(rep), ctx.y, logits.shape[-1])
        metrics["representation_noise"] = noise_ratio
    multiplier = strength_multiplier(
        reg.strength_schedule, state.step, state.total_steps,
        warmup_fraction=reg.warmup_fraction, noise_ratio=noise_ratio,
    )
    metrics["strength_multiplier"] = multiplier
    metrics["jacobian_sq_norms"] = sq_norms
    penalty = dreg_penalty(sq_norms, widths, strength=state.strength * multiplier,
                           scaling=reg.dreg_scaling)
    return LossTerms(logits, mean_data_loss(logits, ctx), penalty, updates, metrics)


def _igpen_loss(ctx) -> LossTerms:
    def per_example(inp):  # weighted so that their mean is the weighted mean (class_weight)
        logits = ctx.state.apply_fn(ctx.variables, inp)
        losses = per_example_loss(logits, ctx.y, ctx.config.task)
        if ctx.weights is not None:
            losses = losses * ctx.weights / jnp.maximum(jnp.mean(ctx.weights), 1e-12)
        return losses, logits

    data_loss, penalty, logits = input_gradient_penalty(
        per_example, ctx.x, strength=ctx.state.strength, has_aux=True
    )
    return LossTerms(logits, data_loss, penalty, {}, {})


def _jacobian_loss(ctx) -> LossTerms:
    logits, penalty = network_jacobian_penalty(
        lambda inp: ctx.state.apply_fn(ctx.variables, inp), ctx.x, ctx.key, strength=ctx.state.strength
    )
    return LossTerms(logits, mean_data_loss(logits, ctx), penalty, {}, {})


#: How the weight-decay strength enters the update (``RegularizerConfig.weight_decay_reading``).
WEIGHT_DECAY_READINGS = ("times_lr", "per_step", "normalized")


def _dreg_user_model(config):
    """DREG options that read the built-in MLP, refused on the user's own model."""
    reg = config.regularizer
    if reg.dreg_scope == "layer" and not config.model.jacobian_layers:
        raise ValueError('dreg_scope="layer" on your own module needs ModelConfig.jacobian_layers '
                         '(submodule paths, e.g. ("block0/ffn",))')
    if reg.strength_schedule == "noise_inverse" and reg.noise_representation == "penultimate":
        raise ValueError('noise_representation="penultimate" reads the built-in MLP\'s last hidden '
                         'layer; use noise_representation="input" with your own module')


def decay_per_step(reading: str, strength, learning_rate, total_steps=None):
    r"""The factor :math:`\mu` of :math:`\theta \leftarrow \theta - \mu\,\theta` applied every step.

    * ``times_lr`` (optax, PyTorch AdamW): :math:`\mu = \eta\lambda`;
    * ``per_step`` (Loshchilov & Hutter 2019, Algorithm 2 with schedule multiplier 1):
      :math:`\mu = \lambda`, not multiplied by the learning rate;
    * ``normalized`` (Loshchilov & Hutter 2019, normalized weight decay
      :math:`\lambda = \lambda_{norm}\sqrt{b / (B T)}`, i.e. one over the square root of the
      run's optimizer steps): :math:`\mu = \lambda / \sqrt{\text{total steps}}`, so the
      same ``strength`` acts alike on a 60-step and a 1,000-step run.
    """
    if reading == "times_lr":
        return learning_rate * strength
    if reading == "per_step":
        return strength
    if total_steps is None:
        raise ValueError("weight_decay_reading='normalized' divides by the run's optimizer steps: pass "
                         "total_steps=epochs * steps_per_epoch to create_train_state")
    return strength / jnp.sqrt(jnp.asarray(total_steps, jnp.float32))


def _adamw(reg_config, learning_rate, strength, total_steps=None):
    """AdamW whose decoupled decay per step is :func:`decay_per_step` (optax multiplies its
    ``weight_decay`` by the learning rate, so it gets ``mu / lr``)."""
    mu = decay_per_step(reg_config.weight_decay_reading, strength, learning_rate, total_steps)
    return optax.inject_hyperparams(optax.adamw)(learning_rate=learning_rate, weight_decay=mu / learning_rate)


def _coherent_adam(reg_config, learning_rate, strength, total_steps=None):
    def coherent_adam(learning_rate, l2):
        return optax.chain(
            coherent_strong_regularization(
                l2=l2, l1=reg_config.coherent_l1, decay=reg_config.coherent_decay,
                threshold=reg_config.coherent_threshold,
            ),
            optax.adam(learning_rate),
        )
    return optax.inject_hyperparams(coherent_adam)(learning_rate=learning_rate, l2=strength)


def _adam(reg_config, learning_rate, strength, total_steps=None):
    del reg_config, strength, total_steps
    return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)


@dataclasses.dataclass(frozen=True)
class Regularizer:
    """One regularizer kind.

    Attributes:
      name: the config name (``RegularizerConfig.kind``, ``--regularizers``).
      label: short label for tables and plots.
      default_strength: the strength used when a config gives none (None: no strength).
      source: where the default comes from.
      loss: ``ctx -> LossTerms``; ``ctx`` carries ``state, variables, x, y, key, config, apply``.
      optimizer: ``(RegularizerConfig, learning_rate, strength, total_steps) -> GradientTransformation``.
      spectral_norm: whether the model's Dense layers are spectrally normalized.
      step_cost: a train step's cost relative to a plain step (the engine's grouping cost
        model, :mod:`dreg_jax.engine.grouping`; measured by ``benchmarks/step_cost.py``).
      schedulable: whether ``strength_schedule`` (lambda_t, :mod:`dreg_jax.penalties.schedules`)
        and several readings (``dreg_scope``) apply to it.
      curves: the per-epoch curves only this kind produces (the others' rows leave them out).
      check_user_model: ``TrainConfig -> None``, refusing options that need the built-in MLP
        when the model is the user's own.
    """

    name: str
    label: str
    default_strength: float | None
    source: str
    loss: Callable = _plain_loss
    optimizer: Callable = _adam
    spectral_norm: bool = False
    step_cost: float = 1.0
    schedulable: bool = False
    curves: tuple = ()
    check_user_model: Callable = lambda config: None

    @property
    def decoupled_decay(self) -> bool:
        """Whether its optimizer is AdamW's decoupled decay (a folded program's decay runs)."""
        return self.optimizer is _adamw

    @property
    def penalizes_loss(self) -> bool:
        return self.loss is not _plain_loss

    @property
    def foldable(self) -> bool:
        """Whether runs of this kind can share a program with other kinds (the run axis):
        the same model and the same optimizer state (Adam, or AdamW at decay 0)."""
        return not self.spectral_norm and self.optimizer in (_adam, _adamw)


REGISTRY: dict[str, Regularizer] = {r.name: r for r in (
    Regularizer("none", "none", None, "no regularization"),
    Regularizer("weight_decay", "WD", 1e-4,
                "AdamW's decoupled decay, theta -= strength * theta every step (Loshchilov & Hutter's "
                "per-step reading; weight_decay_reading='times_lr' multiplies it by the learning rate, "
                "as optax and PyTorch do)", optimizer=_adamw),
    Regularizer("spectral_norm", "SN", None,
                "Miyato et al. 2018; flax.linen.SpectralNorm, one power-iteration step per train step",
                spectral_norm=True),
    Regularizer("igpen", "IGPen", DEFAULT_IGPEN_LAMBDA,
                "Drucker & LeCun 1992 style double backprop on the mean squared input gradient",
                loss=_igpen_loss, step_cost=3.0),
    Regularizer("jacobian", "JacReg", DEFAULT_JACOBIAN_LAMBDA,
                "Hoffman et al. 2019: lambda_JR = 1e-2, one random projection", loss=_jacobian_loss,
                step_cost=2.5),
    Regularizer("dreg", "DREG", DEFAULT_LAMBDA, "the DREG study: 10^-2.5, fixed, no per-dataset tuning",
                loss=_dreg_loss, step_cost=1.1, schedulable=True,
                curves=("strength_multiplier", "representation_noise"), check_user_model=_dreg_user_model),
    Regularizer("coherent", "Coherent", 1e-2,
                "strong coupled L2 of 100x the WD default while gradient coherence >= 0.5",
                optimizer=_coherent_adam),
)}

#: Names in report order, and ``name -> default strength`` (None: the kind has no strength).
REGULARIZERS = tuple(REGISTRY)
#: Curves some kinds produce (each kind's own in ``Regularizer.curves``; in a folded program the
#: other runs' values are NaN padding, left out of their records).
KIND_CURVES = tuple(dict.fromkeys(c for r in REGISTRY.values() for c in r.curves))
DEFAULT_STRENGTHS = {name: r.default_strength for name, r in REGISTRY.items()}


def get_regularizer(name: str) -> Regularizer:
    """The :class:`Regularizer` called ``name`` (a ValueError lists the valid names)."""
    if name not in REGISTRY:
        check_choice("regularizer", name, REGULARIZERS)
    return REGISTRY[name]
