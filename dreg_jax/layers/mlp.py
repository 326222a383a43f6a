"""MLP builder whose pass can also return the per-layer DREG terms.

Architecture: ``x -> [Dense_l -> activation_l] for l in hidden -> Dense(num_classes)``.
Dense layers are optionally spectral-normalized with :class:`flax.linen.SpectralNorm`
(power iteration, one step per training call, stats in the ``batch_stats`` collection).

The DREG terms cover the hidden layers (the output layer is linear and its Jacobian is the
classifier itself, so it is left out):

* ``jacobian_scope="activation"``: :math:`s_l = E_x \\sum_i \\sigma'(z_{l,i})^2`, exact, elementwise;
* ``jacobian_scope="layer"``: :math:`s_l = E_x\\|\\operatorname{diag}(\\sigma'(z_l)) W_l\\|_F^2`,
  estimated with Rademacher probes by :func:`dreg_jax.layer_jacobian_sq_norms`
  (``layer_estimator="probe"``) or exactly from the closed form
  :math:`\\sum_j \\sigma'(z_j)^2 \\|W_{:,j}\\|^2` (``layer_estimator="exact"``).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreg_jax._checks import check_choice, check_float_array
from dreg_jax.layers.activations import check_activation, get_activation
from dreg_jax.layers.chainzrule import ChainzRule
from dreg_jax.penalties.dreg import LAYER_ESTIMATORS, SCOPES
from dreg_jax.penalties.layer_jacobian import (
    elementwise_value_and_derivative,
    layer_jacobian_sq_norms,
)


class MLP(nn.Module):
    """Multi-layer perceptron with a named activation.

    Attributes:
      hidden: widths of the hidden layers.
      num_classes: outputs (logits).
      activation: one of ``dreg_jax.ACTIVATIONS`` (``relu``, ``gelu``, ``tanh``,
        ``chainzrule``, ...), or a tuple of them: a *folded* MLP that holds every listed
        activation (ChainzRule's coefficients included when listed) and applies the one at
        ``variables["fold"]["activation_index"]`` (default 0), a traced per-run value, so runs
        with different activations share one compiled program (the engine's run axis). Every
        activation is computed and one selected: the selected run's forward values and
        gradients are those of the plain MLP with that activation (the others get zero
        cotangents), and the parameter paths are the same, so a seed initializes it alike.
      spectral_norm: wrap every hidden Dense in ``nn.SpectralNorm``.
      spectral_norm_head: with ``spectral_norm``, also wrap the output Dense (default True;
        False leaves the logits' scale free).
      chainzrule_per_feature / chainzrule_init / chainzrule_input_bound: ChainzRule options.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.

    A padded program (a shape bucket, :mod:`dreg_jax.engine.buckets`) passes the run's true
    class count as ``variables["fold"]["num_classes"]`` (traced): the logits of the classes
    beyond it are ``-inf`` (probability 0, no gradient), so the padded head computes the
    unpadded softmax.
    """

    hidden: Sequence[int] = (64, 64, 64)
    num_classes: int = 2
    activation: str | tuple[str, ...] = "gelu"
    spectral_norm: bool = False
    spectral_norm_head: bool = True
    chainzrule_per_feature: bool = True
    chainzrule_init: str = "gelu"
    chainzrule_input_bound: float | None = 4.0
    dtype: Any = None

    def setup(self):
        self.activations = (self.activation,) if isinstance(self.activation, str) else tuple(self.activation)
        if not self.activations:
            raise ValueError("activation must name at least one activation")
        for name in self.activations:
            check_activation(name)
        if not self.hidden or min(self.hidden) < 1 or self.num_classes < 1:
            raise ValueError(
                f"hidden must be non-empty positive widths and num_classes >= 1, got "
                f"hidden={tuple(self.hidden)}, num_classes={self.num_classes}"
            )
        self.dense = [self._make_dense(w, self.spectral_norm) for w in self.hidden]
        self.head = self._make_dense(self.num_classes, self.spectral_norm and self.spectral_norm_head)
        if "chainzrule" in self.activations:
            self.cubic = [
                ChainzRule(
                    per_feature=self.chainzrule_per_feature,
                    coefficient_init=self.chainzrule_init,
                    input_bound=self.chainzrule_input_bound,
                )
                for _ in self.hidden
            ]

    def _make_dense(self, width, normalized):
        dense = nn.Dense(width, dtype=self.dtype)
        return nn.SpectralNorm(dense) if normalized else dense

    @staticmethod
    def _affine(layer, h, update_stats):
        return layer(h, update_stats=update_stats) if isinstance(layer, nn.SpectralNorm) else layer(h)

    def _one_with_derivative(self, name, z, i):
        if name == "chainzrule":
            return self.cubic[i].value_and_derivative(z)
        return elementwise_value_and_derivative(get_activation(name), z)

    def _one(self, name, z, i):
        return self.cubic[i](z) if name == "chainzrule" else get_activation(name)(z)

    def _selected(self, outputs):
        """The output of the run's activation (``fold/activation_index``) among all computed."""
        if len(outputs) == 1:
            return outputs[0]
        index = jnp.asarray(self.get_variable("fold", "activation_index", 0), jnp.int32)
        index = jnp.clip(index, 0, len(outputs) - 1)
        return jax.tree_util.tree_map(lambda *leaves: jax.lax.select_n(index, *leaves), *outputs)

    def _activate_with_derivative(self, z, i):
        return self._selected([self._one_with_derivative(name, z, i) for name in self.activations])

    def _activate(self, z, i):
        return self._selected([self._one(name, z, i) for name in self.activations])

    def _check_input(self, x):
        check_float_array(x, "x", exact_ndim=2)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        return x

    def hidden_layer(self, h, i: int, update_stats: bool = False):
        """Hidden layer ``i``: ``activation(Dense_i(h))``."""
        return self._activate(self._affine(self.dense[i], h, update_stats), i)

    def __call__(self, x, *, update_stats: bool = False):
        """Logits ``(batch, num_classes)``; ``update_stats`` runs the SN power iteration."""
        h = self._check_input(x)
        for i in range(len(self.hidden)):
            h = self.hidden_layer(h, i, update_stats)
        return self._class_mask(self._affine(self.head, h, update_stats))

    def _class_mask(self, logits):
        """``-inf`` logits for padded classes (``fold/num_classes``; none when absent)."""
        if not self.has_variable("fold", "num_classes"):
            return logits
        count = jnp.asarray(self.get_variable("fold", "num_classes"), jnp.int32)
        return jnp.where(jnp.arange(logits.shape[-1]) < count, logits, -jnp.inf)

    def forward_with_jacobian_terms(
        self, x, key=None, *, jacobian_scope: str = "activation", num_probes: int = 1,
        layer_estimator: str = "probe", update_stats: bool = False,
        return_representation: bool = False, include_output: bool = False, row_weights=None,
    ):
        """Logits and the per-hidden-layer DREG terms from the same pass.

        Args:
          x: ``(batch, features)`` inputs.
          key: PRNG key for the probes (needed for ``jacobian_scope="layer"`` only).
          jacobian_scope: ``"activation"`` (exact, default) or ``"layer"`` (probe estimate).
          num_probes: probes per example and layer for ``jacobian_scope="layer"``.
          layer_estimator: ``"probe"`` (jvp with Rademacher probes) or ``"exact"`` (closed
            form from the kernel's column norms) for ``jacobian_scope="layer"``.
          update_stats: run the spectral-norm power iteration (training).
          return_representation: also return the last hidden layer's output.
          include_output: ``jacobian_scope="layer"`` only: append the output layer's term
            :math:`\\|W_{out}\\|_F^2` (exact: the head is linear, its Jacobian is its kernel).
          row_weights: ``(batch,)`` weights: the terms are the weighted sums over examples
            instead of the means (default: means); a padded evaluation batch gives its padding
            rows weight 0. Activation scope and the exact layer estimator only.

        Returns:
          ``(logits, sq_norms)`` with ``sq_norms`` of shape ``(len(hidden),)`` (``+ 1`` with
          ``include_output``), or
          ``(logits, sq_norms, h)`` with ``h`` the ``(batch, hidden[-1])`` representation
          the head reads (``return_representation=True``).
        """
        check_choice("jacobian_scope", jacobian_scope, SCOPES)
        check_choice("layer_estimator", layer_estimator, LAYER_ESTIMATORS)
        if include_output and jacobian_scope != "layer":
            raise ValueError('include_output=True needs jacobian_scope="layer" (the head has no activation)')
        h = self._check_input(x)
        exact_layer = jacobian_scope == "layer" and layer_estimator == "exact"
        if jacobian_scope == "activation" or exact_layer:
            sq_norms = []
            for i in range(len(self.hidden)):
                z = self._affine(self.dense[i], h, update_stats)
                h, slope = self._activate_with_derivative(z, i)
                sq = jnp.square(slope.astype(jnp.float32))
                if exact_layer:  # ||diag(s) W||_F^2 = sum_j s_j^2 ||W[:, j]||^2
                    sq = sq * jnp.sum(jnp.square(self._effective_kernel(i)), axis=0)
                per_row = jnp.sum(sq, axis=-1)
                sq_norms.append(jnp.mean(per_row) if row_weights is None else jnp.sum(row_weights * per_row))
            sq_norms = jnp.stack(sq_norms)
        else:
            if key is None:
                raise ValueError('jacobian_scope="layer" draws Rademacher probes: pass a PRNG key')
            if row_weights is not None:
                raise ValueError("row_weights applies to jacobian_scope='activation' and the exact layer "
                                 "estimator; the probe estimator averages over the whole batch")
            if self.spectral_norm and update_stats:
                # The power iteration mutates state, which jax.jvp cannot carry: refresh the
                # stats in a plain pass first, then differentiate with the refreshed sigma.
                self(x, update_stats=True)
            layer_fns = [
                (lambda inp, i=i: self.hidden_layer(inp, i)) for i in range(len(self.hidden))
            ]
            h, sq_norms = layer_jacobian_sq_norms(layer_fns, h, key, num_probes)
        probe_pass = jacobian_scope == "layer" and not exact_layer
        logits = self._class_mask(self._affine(self.head, h, False if probe_pass else update_stats))
        if include_output:
            sq_norms = jnp.concatenate([sq_norms, jnp.sum(jnp.square(self._effective_kernel(self.head)))[None]])
        return (logits, sq_norms, h) if return_representation else (logits, sq_norms)

    def _effective_kernel(self, layer):
        """The kernel a Dense (hidden index or the layer) applies: W, or W / sigma under
        spectral normalization."""
        layer = self.dense[layer] if isinstance(layer, int) else layer
        if not isinstance(layer, nn.SpectralNorm):
            return layer.variables["params"]["kernel"].astype(jnp.float32)
        kernel = layer.variables["params"]["layer_instance"]["kernel"].astype(jnp.float32)
        return kernel / layer.variables["batch_stats"]["layer_instance/kernel/sigma"]
