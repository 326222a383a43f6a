r"""DREG terms for any Flax model (linen or NNX), without restructuring it.

:func:`jacobian_terms` runs the model's own forward pass once and, at every selected
submodule call, replaces the call by a forward-mode product that returns the submodule's
output *and* a per-layer Jacobian term from the same pass::

    out, terms = dreg_jax.jacobian_terms(model, variables, x, key=key, layers=["mlp"])
    loss = data_loss(out) + dreg_jax.dreg_penalty(terms)

What a term is. For a selected submodule :math:`f` called on :math:`h` (its first positional
argument; the other arguments are held fixed) the term is the batch mean of an estimate of
:math:`\|J\|_F^2`, :math:`J = \partial f(h)_b / \partial h_b` **of that submodule's own map** at
the input it received in this pass. For a residual block ``x + mlp(x)`` that selects ``mlp``,
the term is the branch's, never :math:`I + J`.

Scopes and estimators:

* ``scope="layer", estimator="probe"`` (any submodule: Dense, Conv, attention, a whole
  block): Rademacher probes :math:`v` through ``jax.jvp`` (``flax.linen.jvp`` for linen),
  :math:`E_v\|Jv\|^2 = \|J\|_F^2`. With ``num_probes=P > 1`` the submodule runs once on the
  batch repeated ``P`` times (row ``b`` of copy ``p`` gets probe ``p``); the output is the first
  copy's.
* ``scope="layer", estimator="exact"`` (closed forms): a Dense or Conv alone,
  :math:`\|W\|_F^2` summed over output positions; an elementwise activation alone,
  :math:`\sum_i\sigma'(z_i)^2`; a submodule whose call is one Dense/Conv followed by one
  marked activation, :math:`\sum_{o} \sigma'(z_o)^2 \sum_{i \to o} W_{i o}^2` (the squared
  kernel's response to an all-ones input gives :math:`\sum_{i\to o} W_{io}^2` for any stride,
  padding or dilation). Anything else is refused with the calls it made.
* ``scope="activation"``: the exact diagonal :math:`\sum_i \sigma'(z_i)^2` of marked
  elementwise activations (:class:`dreg_jax.Activation`, :class:`dreg_jax.NNXActivation`,
  :class:`dreg_jax.ChainzRule`); ``layers=None`` selects all of them.

Row-subsampled probes (``row_fraction = r < 1``): the full batch runs as usual and the probe
product is taken on ``m = max(1, round(r B))`` rows drawn uniformly without replacement. The
mean over the sampled rows is unbiased for the batch mean; with per-row estimates :math:`t_b`
(variance :math:`\sigma^2_{probe}` each) its variance is

.. math:: \operatorname{Var} = \Big(1 - \frac{m}{B}\Big)\frac{S_t^2}{m} + \frac{\bar\sigma^2_{probe}}{m P},

:math:`S_t^2` the variance of the rows' :math:`\|J_b\|_F^2` across the batch. The probe pass
then costs ``m / B`` of a full one. The sampled rows run through the submodule a second time,
so a submodule that updates mutable state (batch statistics) is refused for ``r < 1``; with
dropout the second pass draws its own mask.

Probes and sampled rows are reproducible: the ``k``-th recorded call (in call order, from 0)
draws its probes from ``fold_in(key, k)``: ``rademacher(fold_in(k_call, 0), (P, *h.shape))``
and, for ``r < 1``, rows ``permutation(fold_in(k_call, 1), B)[:m]`` (see :func:`call_key`).

Keys of ``terms`` are the submodule paths: scope names joined with ``/`` as in the params tree
for linen (``"Block_0/Dense_1"``), attribute names and indices for NNX (``"blocks/0/mlp"``).
A submodule called more than once gets one entry per call, ``"path#0"``, ``"path#1"``, ... in
call order. Selected submodules may be nested (a block and its Dense layers): each gets its
own term. Submodules inside lifted transforms (``nn.scan``, ``nn.remat``, ``nnx.scan``) are
not supported: select them outside, or use the probe chain API.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreg_jax._checks import check_choice, check_positive_int, is_concrete
from dreg_jax.layers.chainzrule import ChainzRule
from dreg_jax.layers.elementwise import Activation, NNXActivation
from dreg_jax.penalties.layer_jacobian import row_sq_norm_mean
from dreg_jax.penalties.probes import rademacher

TERM_SCOPES = ("layer", "activation")
TERM_ESTIMATORS = ("probe", "exact")
ELEMENTWISE_MODULES = (Activation, NNXActivation, ChainzRule)
_LINEN_LINEAR = (nn.Dense, nn.Conv)
_NNX_LINEAR = (nnx.Linear, nnx.Conv)


def call_key(key, call_index: int):
    """The key of the ``call_index``-th recorded call: probes from ``fold_in(., 0)``, rows from ``fold_in(., 1)``."""
    return jax.random.fold_in(key, call_index)


def _sq_norm_rows(tangents):
    """Mean over rows of the squared norm of a pytree of ``(rows, ...)`` tangents."""
    leaves = [t for t in jax.tree_util.tree_leaves(tangents) if jnp.issubdtype(t.dtype, jnp.inexact)]
    return sum(row_sq_norm_mean(t.reshape((1, t.shape[0]) + t.shape[1:])) for t in leaves)


@dataclasses.dataclass
class _Call:
    """A child call seen inside an exact-estimator frame."""

    kind: str  # "linear" | "activation" | "other"
    module: Any
    inputs: Any
    output: Any
    slope: Any = None


class _Recorder:
    """State of one ``jacobian_terms`` pass: selection, options, recorded terms."""

    def __init__(self, layers, scope, estimator, key, num_probes, row_fraction, adapter):
        self.paths = {l for l in layers if isinstance(l, str)}
        self.types = tuple(l for l in layers if isinstance(l, type))
        self.select_all_elementwise = not layers
        self.scope, self.estimator = scope, estimator
        self.key, self.num_probes, self.row_fraction = key, num_probes, row_fraction
        self.adapter = adapter
        self.entries: list[list] = []  # [path, value, width]
        self.seen: dict[str, str] = {}  # every module path called -> type name
        self.matched_paths: set[str] = set()
        self.passthrough = 0  # > 0: calls go straight through (sub-passes, closed forms)
        self.frames: list[list[_Call]] = []  # exact-estimator frames recording child calls

    # -- selection -------------------------------------------------------------------------
    def selected(self, path: str, module) -> bool:
        if self.select_all_elementwise:
            return isinstance(module, ELEMENTWISE_MODULES)
        if path in self.paths:
            self.matched_paths.add(path)
            return True
        return bool(self.types) and isinstance(module, self.types)

    # -- one call --------------------------------------------------------------------------
    def handle(self, path, module, call, args, kwargs):
        """Runs ``call(*args, **kwargs)`` (the original call), recording a term if selected."""
        self.seen.setdefault(path, type(module).__name__)
        if self.passthrough:
            return call(*args, **kwargs)
        if self.frames and (is_elementwise(module) or self.adapter.is_linear(module)):
            return self._record_child(module, call, args, kwargs)
        if not self.selected(path, module):
            return call(*args, **kwargs)
        if not args:
            raise TypeError(f"submodule {path!r} was called without a positional input; "
                            "jacobian_terms differentiates the first positional argument")
        h, rest = args[0], args[1:]
        _check_input(h, path)
        index = len(self.entries)
        entry = [path, None, None]
        self.entries.append(entry)
        k_call = call_key(self.key, index)
        if self.scope == "activation" or (self.estimator == "exact" and is_elementwise(module)):
            if not is_elementwise(module):
                raise ValueError(
                    f'scope="activation" needs marked elementwise activations, but {path!r} is a '
                    f"{type(module).__name__}; wrap the activation as dreg_jax.Activation(fn) "
                    f"(dreg_jax.NNXActivation for NNX) or use scope=\"layer\""
                )
            y, slope = module.value_and_derivative(h, *rest, **kwargs)
            value = _mean_row_sum(jnp.square(slope.astype(jnp.float32)))
        elif self.estimator == "exact":
            y, value = self._exact(path, module, call, h, rest, kwargs)
        else:
            y, value = self._probe(path, module, call, h, rest, kwargs, k_call)
        _check_output(y, h.shape[0], path)
        entry[1] = value
        entry[2] = sum(math.prod(l.shape[1:]) for l in jax.tree_util.tree_leaves(y))
        return y

    def _probe(self, path, module, call, h, rest, kwargs, k_call):
        batch, probes = h.shape[0], self.num_probes
        if self.row_fraction < 1.0:
            y = call(h, *rest, **kwargs)
            m = max(1, round(self.row_fraction * batch))
            rows = jax.random.permutation(jax.random.fold_in(k_call, 1), batch)[:m]
            h_probe = h[rows]
        else:
            y, h_probe = None, h
        v = rademacher(jax.random.fold_in(k_call, 0), (probes,) + h_probe.shape, h.dtype)
        tiled = h_probe if probes == 1 else jnp.broadcast_to(
            h_probe[None], (probes,) + h_probe.shape).reshape((-1,) + h_probe.shape[1:])
        v = v.reshape(tiled.shape)
        if y is not None:  # row-subsampled: a side pass on the sampled rows only
            self.passthrough += 1
            try:
                _, jv, _ = self.adapter.jvp(module, call, tiled, v, rest, kwargs, side_pass=True, path=path)
            finally:
                self.passthrough -= 1
            return y, _sq_norm_rows(jv)
        start = len(self.entries)
        y_full, jv, nested = self.adapter.jvp(
            module, call, tiled, v, rest, kwargs, side_pass=False, path=path,
            nested=lambda: tuple(e[1] for e in self.entries[start:]),
        )
        for e, value in zip(self.entries[start:], nested):  # primal values of nested terms
            e[1] = value
        y = y_full if probes == 1 else jax.tree_util.tree_map(lambda a: a[:batch], y_full)
        return y, _sq_norm_rows(jv)

    def _exact(self, path, module, call, h, rest, kwargs):
        if self.adapter.is_linear(module):
            y = call(h, *rest, **kwargs)
            response = self._linear_response(module, h)
            return y, jnp.sum(response)
        self.frames.append([])
        try:
            y = call(h, *rest, **kwargs)
        finally:
            calls = self.frames.pop()
        kinds = [c.kind for c in calls]
        if (kinds != ["linear", "activation"] or calls[1].inputs is not calls[0].output
                or y is not calls[1].output or calls[0].inputs is not h):
            made = ", ".join(f"{type(c.module).__name__}" for c in calls) or "none"
            raise ValueError(
                f'estimator="exact" has no closed form for {path!r} ({type(module).__name__}): it '
                f"needs a submodule whose call is one Dense/Conv on its input followed by one marked "
                f"activation (dreg_jax.Activation, NNXActivation or ChainzRule) giving its output; "
                f"its calls were: [{made}]. Use estimator=\"probe\" for this submodule"
            )
        response = self._linear_response(calls[0].module, h)
        value = _mean_row_sum(jnp.square(calls[1].slope.astype(jnp.float32)) * response)
        return y, value

    def _linear_response(self, module, h):
        """``sum_{i -> o} W_io^2`` per output unit: the squared kernel applied to ones (no bias)."""
        self.passthrough += 1
        try:
            return self.adapter.squared_kernel_response(module, jnp.ones((1,) + h.shape[1:], jnp.float32))
        finally:
            self.passthrough -= 1

    def _record_child(self, module, call, args, kwargs):
        frame = self.frames[-1]
        if is_elementwise(module):
            self.frames.append([])  # a ChainzRule's internals are not children of the frame
            self.passthrough += 1
            try:
                y, slope = module.value_and_derivative(*args, **kwargs)
            finally:
                self.passthrough -= 1
                self.frames.pop()
            frame.append(_Call("activation", module, args[0], y, slope))
            return y
        y = call(*args, **kwargs)
        frame.append(_Call("linear", module, args[0] if args else None, y))
        return y

    # -- results ---------------------------------------------------------------------------
    def check_selection(self, available: dict[str, str]):
        missing = sorted(self.paths - self.matched_paths)
        if missing:
            listing = ", ".join(f"{p} ({t})" for p, t in sorted(available.items()) if p) or "(none)"
            raise ValueError(
                f"layers {missing} name no submodule called in this forward pass; the model's "
                f"submodule paths are: {listing}"
            )
        if not self.entries:
            if self.select_all_elementwise:
                raise ValueError(
                    'scope="activation" with layers=None found no marked activation: replace '
                    "nn.gelu etc. by dreg_jax.Activation(nn.gelu) (NNXActivation for NNX) or pass layers"
                )
            names = sorted({t for t in available.values()})
            raise ValueError(
                f"layers {[getattr(t, '__name__', t) for t in self.types]} selected no submodule "
                f"called in this forward pass; module types present: {', '.join(names)}"
            )

    def _keys(self) -> list[str]:
        """Entry keys in call order: the path, or ``path#k`` for a submodule called more than once."""
        counts = collections.Counter(path for path, _, _ in self.entries)
        seen: dict[str, int] = collections.defaultdict(int)
        keys = []
        for path, _, _ in self.entries:
            if counts[path] > 1:
                keys.append(f"{path}#{seen[path]}")
                seen[path] += 1
            else:
                keys.append(path)
        return keys

    def terms(self) -> dict:
        return {k: e[1] for k, e in zip(self._keys(), self.entries)}

    def widths(self) -> dict:
        return {k: e[2] for k, e in zip(self._keys(), self.entries)}


def is_elementwise(module) -> bool:
    return isinstance(module, ELEMENTWISE_MODULES)


def _mean_row_sum(sq):
    return jnp.mean(jnp.sum(sq.reshape(sq.shape[0], -1), axis=-1))


def _check_input(h, path):
    if not hasattr(h, "dtype") or not jnp.issubdtype(h.dtype, jnp.floating) or h.ndim < 1:
        what = getattr(h, "dtype", type(h).__name__)
        raise TypeError(
            f"submodule {path!r} receives {what} input; a Jacobian needs a floating (batch, ...) "
            "array as its first argument (select the submodules after an embedding lookup)"
        )
    if h.shape[0] == 0:
        raise ValueError(f"submodule {path!r} receives an empty batch {tuple(h.shape)}: a batch "
                         "mean needs at least one row")


def _check_model_input(x):
    """Eager checks of the model input: a batch axis with rows, finite floats (ints are tokens)."""
    if not hasattr(x, "shape") or getattr(x, "ndim", 0) < 1:
        raise ValueError(f"x must be an array with a leading batch axis, got {type(x).__name__}")
    if x.shape[0] == 0:
        raise ValueError(f"x is an empty batch (shape {tuple(x.shape)}): a batch mean needs >= 1 row")
    # numpy, not jnp: a concrete closure constant inside a trace would give a tracer
    if jnp.issubdtype(x.dtype, jnp.floating) and is_concrete(x) and not np.isfinite(np.asarray(x, np.float32)).all():
        raise ValueError("x contains NaN/inf; clean or impute the data before computing DREG terms")


def _check_output(y, batch, path):
    leaves = jax.tree_util.tree_leaves(y)
    for leaf in leaves:
        if getattr(leaf, "ndim", 0) < 1 or leaf.shape[0] != batch:
            raise ValueError(
                f"submodule {path!r} must map (batch, ...) to outputs that keep the batch axis "
                f"(batch={batch}); it returned shape {getattr(leaf, 'shape', type(leaf).__name__)}. "
                "Select a submodule that acts per example"
            )


# ---------------------------------------------------------------------------------------
# linen
# ---------------------------------------------------------------------------------------
class _LinenAdapter:
    @staticmethod
    def is_linear(module) -> bool:
        return isinstance(module, _LINEN_LINEAR)

    def __init__(self):
        self.bypass = 0  # the next call(s) of a lifted clone run without interception

    def jvp(self, module, call, h, v, rest, kwargs, *, side_pass, path, nested=lambda: ()):
        def fn(mdl, inp):
            self.bypass += 1
            out = mdl(inp, *rest, **kwargs)
            return out, nested()

        before = _mutable_leaves(module)
        if _has_module_fields(module):
            # nn.jvp cannot lift modules passed as attributes (nn.Sequential, wrappers): a plain
            # jax.jvp of the call is the same product; it cannot carry mutable state updates.
            def raw(inp):
                return call(inp, *rest, **kwargs), nested()

            (y, aux), (jv, _) = jax.jvp(raw, (h,), (v,))
        else:
            (y, aux), (jv, _) = nn.jvp(fn, module, (h,), (v,), {})
        if side_pass and any(a is not b for a, b in zip(before, _mutable_leaves(module))):
            raise ValueError(
                f"row_fraction < 1 runs {path!r} a second time on the sampled rows, and that pass "
                "changed its mutable state (e.g. batch statistics); use row_fraction=1 for it"
            )
        return y, jv, aux

    @staticmethod
    def squared_kernel_response(module, ones):
        params = module.variables["params"]
        sq = {"kernel": jnp.square(params["kernel"].astype(jnp.float32))}
        if "bias" in params:
            sq["bias"] = jnp.zeros_like(params["bias"], jnp.float32)
        clone = module.clone(parent=None, dtype=jnp.float32, param_dtype=jnp.float32)
        return clone.apply({"params": sq}, ones)


def _has_module_fields(module) -> bool:
    """Whether a dataclass field of ``module`` holds modules (passed in, not made in setup)."""
    for field in dataclasses.fields(module):
        if field.name in ("parent", "name"):
            continue
        value = getattr(module, field.name, None)
        if any(isinstance(leaf, nn.Module) for leaf in jax.tree_util.tree_leaves(
                value, is_leaf=lambda a: isinstance(a, nn.Module))):
            return True
    return False


def _mutable_leaves(module):
    variables = module.variables
    return jax.tree_util.tree_leaves({k: v for k, v in variables.items() if k != "params"})


def _linen_terms(model, variables, x, args, kwargs, recorder: _Recorder):
    adapter: _LinenAdapter = recorder.adapter

    def interceptor(next_fun, call_args, call_kwargs, ctx):
        if ctx.method_name != "__call__":
            return next_fun(*call_args, **call_kwargs)
        if adapter.bypass:
            adapter.bypass -= 1
            return next_fun(*call_args, **call_kwargs)
        path = "/".join(ctx.module.scope.path) if ctx.module.scope is not None else ""
        if not path:  # the root module is the model itself
            return next_fun(*call_args, **call_kwargs)
        return recorder.handle(path, ctx.module, next_fun, call_args, call_kwargs)

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, x, *args, **kwargs)
    recorder.check_selection(recorder.seen)
    return out


# ---------------------------------------------------------------------------------------
# NNX
# ---------------------------------------------------------------------------------------
class _NNXAdapter:
    @staticmethod
    def is_linear(module) -> bool:
        return isinstance(module, _NNX_LINEAR)

    @staticmethod
    def jvp(module, call, h, v, rest, kwargs, *, side_pass, path, nested=lambda: ()):
        del path
        graphdef, state = nnx.split(module)

        def fn(inp):
            # fresh Variables at this trace level (mutating the outer ones here is an error)
            copy = nnx.merge(graphdef, jax.tree_util.tree_map(lambda a: a, state))
            out = call.__func__(copy, inp, *rest, **kwargs) if hasattr(call, "__func__") else call(inp, *rest, **kwargs)
            return out, nnx.state(copy), nested()

        (y, new_state, aux), (jv, _, _) = jax.jvp(fn, (h,), (v,))
        if not side_pass:  # a side pass's state changes (rng counts, statistics) are dropped
            nnx.update(module, new_state)
        return y, jv, aux

    @staticmethod
    def squared_kernel_response(module, ones):
        kernel = module.kernel[...].astype(jnp.float32)
        if isinstance(module, nnx.Linear):
            return jnp.broadcast_to(jnp.sum(jnp.square(kernel), axis=0), ones.shape[:-1] + kernel.shape[-1:])
        graphdef, state = nnx.split(module)
        copy = nnx.merge(graphdef, state)
        copy.kernel = nnx.Param(jnp.square(kernel))
        if getattr(copy, "bias", None) is not None:
            copy.bias = nnx.Param(jnp.zeros_like(copy.bias[...], jnp.float32))
        return _original_class(copy).__call__(copy, ones)


_HOOKED: dict[type, type] = {}


def _original_class(module) -> type:
    cls = type(module)
    return getattr(cls, "_dreg_original", cls)


def _hooked_class(cls, recorder_ref):
    """A subclass whose ``__call__`` goes through the active recorder (one per original class)."""
    if cls in _HOOKED:
        return _HOOKED[cls]

    def __call__(self, *args, **kwargs):
        recorder = recorder_ref[-1] if recorder_ref else None
        bound = cls.__call__.__get__(self)
        if recorder is None:
            return bound(*args, **kwargs)
        return recorder.handle(self._dreg_path, self, bound, args, kwargs)

    hooked = type(cls.__name__, (cls,), {"__call__": __call__, "_dreg_original": cls,
                                         "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    _HOOKED[cls] = hooked
    return hooked


_NNX_ACTIVE: list[_Recorder] = []


def nnx_module_paths(model) -> dict[str, Any]:
    """``path -> submodule`` of an NNX model (attribute names and indices joined with ``/``)."""
    return {"/".join(map(str, p)): m for p, m in nnx.iter_graph(model)
            if isinstance(m, nnx.Module) and p}


def _nnx_terms(model, x, args, kwargs, recorder: _Recorder):
    modules = nnx_module_paths(model)
    available = {p: type(m).__name__ for p, m in modules.items()}
    if recorder.paths - set(modules):  # fail before running anything, listing the paths
        recorder.check_selection(available)
    swapped = []
    try:
        for path, m in modules.items():
            # selected submodules, plus the leaf types an exact-estimator frame must see
            if (isinstance(m, _NNX_LINEAR + (NNXActivation,)) or path in recorder.paths
                    or (recorder.types and isinstance(m, recorder.types))):
                original = _original_class(m)
                m.__dict__["_dreg_path"] = path
                object.__setattr__(m, "__class__", _hooked_class(original, _NNX_ACTIVE))
                swapped.append((m, original))
        _NNX_ACTIVE.append(recorder)
        try:
            out = model(x, *args, **kwargs)
        finally:
            _NNX_ACTIVE.pop()
    finally:
        for m, original in swapped:  # the model leaves exactly as it came
            object.__setattr__(m, "__class__", original)
            m.__dict__.pop("_dreg_path", None)
    recorder.check_selection(available)
    return out


# ---------------------------------------------------------------------------------------
# public
# ---------------------------------------------------------------------------------------
def _check_layers(layers, scope):
    if layers is None:
        if scope == "layer":
            raise ValueError('scope="layer" needs layers=[...]: submodule paths (e.g. "Block_0/mlp") '
                             "or types (e.g. nn.Dense)")
        return ()
    if isinstance(layers, (str, type)):
        layers = [layers]
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers=[] selects nothing: pass submodule paths or types, or layers=None "
                         'with scope="activation" for every marked activation')
    for item in layers:
        if not isinstance(item, (str, type)):
            raise TypeError(f"layers items must be paths (str) or module types, got {item!r}")
        if isinstance(item, str) and (not item or item.startswith("/") or item.endswith("/")):
            raise ValueError(f"layer path {item!r} is empty or has a leading/trailing '/'; use e.g. 'Block_0/mlp'")
    return layers


def jacobian_terms(model, variables, x, *args, key=None, layers=None, scope: str = "layer",
                   estimator: str = "probe", num_probes: int = 1, row_fraction: float = 1.0,
                   **kwargs):
    """Forward pass of ``model`` plus one DREG term per selected submodule call.

    Args:
      model: an unbound linen module (with ``variables``) or an NNX module (``variables=None``).
      variables: the linen variables (``{"params": ...}``, plus other collections); None for NNX.
      x: the first argument of the model call; ``*args`` / ``**kwargs`` follow it, passed to
        ``model.apply`` (linen: ``train=False``, ``rngs=``, ``mutable=``) or to ``model(...)`` (NNX).
      key: PRNG key for the probes (needed by ``estimator="probe"`` in the layer scope).
      layers: paths (``"Block_0/mlp"``; ``/``-joined scope or attribute names) and/or module
        types (``nn.Dense``) to penalize; None in the activation scope selects every marked
        activation.
      scope: ``"layer"`` (the submodule's map) or ``"activation"`` (exact ``sigma'(z)^2``).
      estimator: ``"probe"`` (any submodule) or ``"exact"`` (closed forms; see module docs).
      num_probes: Rademacher probes per row (layer scope, probe estimator).
      row_fraction: share of batch rows that carry probes, in (0, 1] (unbiased; see docs).

    Returns:
      ``(out, terms)``: ``out`` what ``model.apply`` (or ``model(...)``) returns; ``terms`` a
      dict ``path -> scalar`` (float32) in call order, each the batch mean of the estimated
      :math:`\\|J\\|_F^2` of that submodule's own map at the input it received.
    """
    check_choice("scope", scope, TERM_SCOPES)
    check_choice("estimator", estimator, TERM_ESTIMATORS)
    num_probes = check_positive_int(num_probes, "num_probes")
    row_fraction = float(row_fraction)
    if not 0.0 < row_fraction <= 1.0:
        raise ValueError(f"row_fraction must be in (0, 1], got {row_fraction}")
    layers = _check_layers(layers, scope)
    if scope == "layer" and estimator == "probe" and key is None:
        raise ValueError('the probe estimator draws Rademacher probes: pass key=jax.random.key(...)')
    key = jax.random.key(0) if key is None else key
    _check_model_input(x)
    out, recorder = _run(model, variables, x, args, kwargs,
                         (layers, scope, estimator, key, num_probes, row_fraction))
    return out, recorder.terms()


def _run(model, variables, x, args, kwargs, recorder_args):
    """The model's forward pass with a recorder: ``(out, recorder)``, for linen or NNX."""
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise TypeError("an NNX model carries its own state: pass variables=None")
        recorder = _Recorder(*recorder_args, _NNXAdapter())
        return _nnx_terms(model, x, args, kwargs, recorder), recorder
    if isinstance(model, nn.Module):
        if model.scope is not None:
            raise TypeError("pass the unbound linen module (not model.bind(...)) and its variables")
        if not hasattr(variables, "keys"):
            raise TypeError(f"variables must be the model's variable dict, got {type(variables).__name__}")
        recorder = _Recorder(*recorder_args, _LinenAdapter())
        return _linen_terms(model, variables, x, args, kwargs, recorder), recorder
    raise TypeError(f"model must be a flax linen or NNX module, got {type(model).__name__}")


def term_widths(model, variables, x, *args, layers=None, scope: str = "layer",
                estimator: str = "probe", **kwargs) -> dict:
    """Output width (units per example) of every term's submodule call.

    The ``widths`` argument of ``dreg_penalty(terms, widths, scaling="width")``. For linen it
    runs on shapes only (``jax.eval_shape``); an NNX model runs one forward pass.
    """
    recorder_args = (_check_layers(layers, scope), scope, estimator, jax.random.key(0), 1, 1.0)
    if isinstance(model, nnx.Module):
        return _run(model, variables, x, args, kwargs, recorder_args)[1].widths()
    found = {}

    def shapes(x, *args):
        found.update(_run(model, variables, x, args, kwargs, recorder_args)[1].widths())
        return 0

    jax.eval_shape(shapes, x, *args)
    return found
