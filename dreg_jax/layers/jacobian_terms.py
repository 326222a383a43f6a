r"""DREG terms for any Flax model (linen or NNX), without restructuring it.

:func:`jacobian_terms` runs the model's own forward pass once and, at every selected
submodule call, replaces the call by a forward-mode product that returns the submodule's
output *and* a per-layer Jacobian term from the same pass::

    out, terms = dreg_jax.jacobian_terms(model, variables, x, key=key, layers=["mlp"])
    loss = data_loss(out) + dreg_jax.dreg_penalty(terms)

What a term is. For a selected submodule :math:`f` called on a batch :math:`h` (its first
positional argument; the other arguments are held fixed) with output :math:`y = f(h)` (for a
submodule that returns a pytree, :math:`y` is its **first floating array leaf** in pytree order:
``x`` of ``(x, aux)``), the term is

.. math:: T = \frac{1}{B}\,\|J\|_F^2, \qquad J = \frac{\partial\, \mathrm{vec}\, y}{\partial\, \mathrm{vec}\, h},

the Jacobian **of that submodule's own map on the batch** at the input it received in this
pass. For a map that acts on each example alone, :math:`J` is block diagonal and :math:`T` is
the batch mean of the per-example :math:`\|J_b\|_F^2`. For a map that mixes rows (BatchNorm in
training mode: the statistics depend on every row) :math:`T` also counts the cross-row blocks
:math:`\partial y_b / \partial h_c`: it is the Jacobian of the map the layer really computes.
For a residual block ``x + mlp(x)`` that selects ``mlp``, the term is the branch's, never
:math:`I + J`.

Scopes and estimators:

* ``scope="layer", estimator="probe"`` (any submodule: Dense, Conv, attention, a whole
  block): Rademacher probes :math:`v` over the whole batch through ``jax.jvp`` (``flax.linen.jvp``
  for linen), :math:`E_v\|Jv\|^2/B = T`. Probe 0 rides on the model's own pass (the output and
  :math:`Jv` come from one forward-mode pass); probes ``1..P-1`` are a side pass: one
  ``jax.vmap`` over the probes of the submodule's jvp on the same batch, so each probe sees the
  batch exactly as the model's pass did (unbiased for any ``num_probes``, row-mixing layers
  included), and nested selections inside cost linear, not quadratic, in ``num_probes``.
* ``scope="layer", estimator="exact"`` (closed forms): a Dense or Conv alone,
  :math:`\|W\|_F^2` summed over output positions; an elementwise activation alone,
  :math:`\sum_i\sigma'(z_i)^2`; a submodule whose call is one Dense/Conv followed by one
  marked activation, :math:`\sum_{o} \sigma'(z_o)^2 \sum_{i \to o} W_{i o}^2` (the squared
  kernel's response to an all-ones input gives :math:`\sum_{i\to o} W_{io}^2` for any stride,
  zero padding, dilation or ``feature_group_count``). A Dense/Conv subclass that overrides
  ``__call__``, and a Conv whose padding is not zero padding (``"CIRCULAR"``, ``"REFLECT"``:
  two taps can reach the same input) have no closed form and are refused, as is anything else,
  with the calls it made.
* ``scope="activation"``: the exact diagonal :math:`\sum_i \sigma'(z_i)^2` of marked
  elementwise activations (:class:`dreg_jax.Activation`, :class:`dreg_jax.NNXActivation`,
  :class:`dreg_jax.ChainzRule`); ``layers=None`` selects all of them.

Row-subsampled probes (``row_fraction = r < 1``): the full batch runs as usual and the probe
product is taken on ``m = max(1, round(r B))`` rows drawn uniformly without replacement. The
mean over the sampled rows is unbiased for the batch mean; with per-row estimates :math:`t_b`
(variance :math:`\sigma^2_{probe}` each) its variance is

.. math:: \operatorname{Var} = \Big(1 - \frac{m}{B}\Big)\frac{S_t^2}{m} + \frac{\bar\sigma^2_{probe}}{m P},

:math:`S_t^2` the variance of the rows' :math:`\|J_b\|_F^2` across the batch. The probe pass
then costs ``m / B`` of a full one. The sampled rows run through the submodule a second time
(a side pass), so a submodule that mixes rows through mutable state (batch statistics) is
refused for ``r < 1``: its map on ``m`` rows is not its map on the batch.

Side passes (probes ``1..P-1``, sampled rows) draw their own dropout masks (keys folded from
the call's key) and discard any state they change: the model's state and random streams are
those of the plain forward pass, and ``out`` equals ``model.apply`` exactly. One exception: a
linen submodule that holds its layers as attributes (``nn.Sequential``, wrappers) runs its side
pass through the bound call, so dropout inside it draws from the model's own stream: with
``num_probes > 1`` or ``row_fraction < 1`` and dropout active, a later call of that same
submodule draws other masks than under ``apply`` (select its layers, or use ``num_probes=1``).

Probes and sampled rows are reproducible: the ``k``-th recorded call (in call order, from 0)
draws its probes from ``fold_in(key, k)``: ``rademacher(fold_in(k_call, 0), (P, *h.shape))``
and, for ``r < 1``, rows ``permutation(fold_in(k_call, 1), B)[:m]`` (see :func:`call_key`).

On many devices (README "DREG on many devices"):

* ``jax.jit`` with sharded inputs (a classic ``Mesh`` or explicit axes, ``jax.make_mesh``): the
  terms are the global batch's, the same numbers as on one device (the sampled rows of
  ``r < 1`` are gathered replicated: every device sees the ``m`` rows).
* ``shard_map``: each shard computes the terms of its own rows (``||J||_F^2 / B_local``);
  ``lax.pmean`` over the batch axis gives the global batch's mean (equal shards). Each shard must
  draw its own probes and rows, or the shards' estimates are correlated (the spread grows) and,
  with batch statistics synced over the axis, biased. So the key of every recorded call is
  ``fold_in(key, axis_index(a))`` for each mesh axis ``a`` the input varies over:
  found by JAX itself under ``check_vma=True`` (the default), given as ``axis_name=`` under
  ``check_vma=False``. ``row_fraction`` then samples within each shard.

Keys of ``terms`` are the submodule paths: scope names joined with ``/`` as in the params tree
for linen (``"Block_0/Dense_1"``), attribute names and indices for NNX (``"blocks/0/mlp"``).
A submodule called more than once gets one entry per call, ``"path#0"``, ``"path#1"``, ... in
call order. Selected submodules may be nested (a block and its Dense layers): each gets its
own term. A call that re-enters its own module (``super().__call__``, ``nn.SelfAttention``)
counts once.

Lifted transforms. Selections inside ``nn.scan``, ``nn.vmap``, ``nn.remat``/``nn.checkpoint``,
``nn.jit`` and ``nnx.scan``, ``nnx.vmap``, ``nnx.remat`` are supported: each term leaves the
transform through a variable collection (linen: ``"dreg_terms"`` where the transform carries it,
else ``"params"``, which every scanned or vmapped stack maps; NNX: a variable on the module),
so a scanned stack of ``L`` layers gives ``L`` terms ``"path#0"`` .. ``"path#{L-1}"`` (layer
order), equal to the unrolled model's terms. Inside a scan body all layers share the body's
probe draw (the body is traced once). A linen transform that carries neither collection out
(``nn.scan(..., variable_broadcast="params")``) is refused, naming the path and the
workaround: add ``"dreg_terms": 0`` to its ``variable_axes`` or select the transformed module.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreg_jax._checks import check_choice, check_positive_int, is_concrete
from dreg_jax.layers.chainzrule import ChainzRule
from dreg_jax.layers.elementwise import Activation, NNXActivation
from dreg_jax.penalties.dreg import LAYER_ESTIMATORS, SCOPES
from dreg_jax.penalties.layer_jacobian import row_sq_norm_mean
from dreg_jax.penalties.probes import rademacher

# one name each for the scopes and estimators (the configs' tuples); jacobian_terms defaults to
# the layer scope because it selects submodules by path, a config to the activation scope
TERM_SCOPES = SCOPES
TERM_ESTIMATORS = LAYER_ESTIMATORS
TERMS_COLLECTION = "dreg_terms"
ELEMENTWISE_MODULES = (Activation, NNXActivation, ChainzRule)
_LINEN_LINEAR = (nn.Dense, nn.Conv)
_NNX_LINEAR = (nnx.Linear, nnx.Conv)
_ZERO_PADDINGS = ("SAME", "VALID", "CAUSAL", "SAME_LOWER")
_PARAM_PREFIX = "__dreg_term_"


def call_key(key, call_index: int):
    """The key of the ``call_index``-th recorded call: probes from ``fold_in(., 0)``, rows from ``fold_in(., 1)``."""
    return jax.random.fold_in(key, call_index)


def differentiated_leaf(tree):
    """Index (in ``tree_leaves`` order) of the output a term covers: the first floating array leaf."""
    for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact):
            return i
    return None


def _sq_norm_rows(t):
    """Mean over rows of the squared norm of one ``(rows, ...)`` tangent."""
    return row_sq_norm_mean(t.reshape((1, t.shape[0]) + t.shape[1:]))


@dataclasses.dataclass
class _Call:
    """A child call seen inside an exact-estimator frame."""

    kind: str  # "linear" | "activation" | "other"
    module: Any
    inputs: Any
    output: Any
    slope: Any = None


@dataclasses.dataclass
class _Entry:
    """One recorded term: where it was taken, its width, and where its value lives."""

    path: str
    index: int
    width: int = 0
    value: Any = None  # the value itself, when it was taken outside any lifted transform
    carrier: tuple | None = None  # (collection, scope path, name) for values carried by variables
    scope: Any = None  # linen: the scope to write a deferred value into (see _LinenAdapter.settle)


class _Recorder:
    """State of one ``jacobian_terms`` pass: selection, options, recorded terms."""

    def __init__(self, layers, scope, estimator, key, num_probes, row_fraction, adapter):
        self.paths = {l for l in layers if isinstance(l, str)}
        self.types = tuple(l for l in layers if isinstance(l, type))
        self.select_all_elementwise = not layers
        self.scope, self.estimator = scope, estimator
        self.key, self.num_probes, self.row_fraction = key, num_probes, row_fraction
        self.adapter = adapter
        self.entries: list[_Entry] = []
        self.seen: dict[str, str] = {}  # every module path called -> type name
        self.matched_paths: set[str] = set()
        self.active: list[str] = []  # paths of the selected calls being computed (re-entry runs through)
        self.passthrough = 0  # > 0: calls go straight through (side passes, closed forms)
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
        if self.passthrough:  # side pass, closed form
            return call(*args, **kwargs)
        if path in self.active:  # re-entry: super().__call__, or the forward-mode pass's own call
            with self.adapter.reentered(module):
                return call(*args, **kwargs)
        if self.frames and (is_elementwise(module) or self.adapter.is_linear(module)):
            return self._record_child(path, module, call, args, kwargs)
        if not self.selected(path, module):
            return call(*args, **kwargs)
        if not args:
            raise TypeError(f"submodule {path!r} was called without a positional input; "
                            "jacobian_terms differentiates the first positional argument")
        h, rest = args[0], args[1:]
        _check_input(h, path)
        entry = _Entry(path, len(self.entries))
        self.entries.append(entry)
        self.adapter.prepare(self, entry, module)  # refuses before computing, where it must
        k_call = call_key(self.key, entry.index)
        self.active.append(path)
        try:
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
        finally:
            self.active.pop()
        leaf = _check_output(y, h.shape[0], path)
        entry.width = math.prod(leaf.shape[1:])
        self.adapter.store(self, entry, module, value)
        return y

    def _probe(self, path, module, call, h, rest, kwargs, k_call):
        batch, probes = h.shape[0], self.num_probes
        if self.row_fraction < 1.0:
            m = max(1, round(self.row_fraction * batch))
            rows = jax.random.permutation(jax.random.fold_in(k_call, 1), batch)[:m]
            h_probe = _take_rows(h, rows)
        else:
            h_probe = h
        v = rademacher(jax.random.fold_in(k_call, 0), (probes,) + h_probe.shape, h.dtype)
        side = None
        if self.row_fraction < 1.0 or probes > 1:  # built before the model's pass: the state it saw
            side = self.adapter.side_pass(module, call, rest, kwargs, jax.random.fold_in(k_call, 2))
        if self.row_fraction < 1.0:
            y = call(h, *rest, **kwargs)
            estimates, changed = self._side(side, h_probe, v)
            if changed:
                raise ValueError(
                    f"row_fraction < 1 runs {path!r} a second time on the sampled rows, and that pass "
                    "changed its mutable state (e.g. batch statistics): its map on the sampled rows "
                    "is not its map on the batch; use row_fraction=1 for it"
                )
            return y, jnp.mean(estimates)
        start = len(self.entries)
        y, jv, nested = self.adapter.jvp(module, call, h, v[0], rest, kwargs,
                                         nested=lambda: tuple(e.value for e in self.entries[start:]))
        for e, value in zip(self.entries[start:], nested):  # primal values of nested terms
            self.adapter.settle(e, value)
        total = _sq_norm_rows(jax.tree_util.tree_leaves(jv)[differentiated_leaf(y)])
        if probes > 1:
            estimates, _ = self._side(side, h, v[1:])
            total = total + jnp.sum(estimates)
        return y, total / probes

    def _side(self, side, h, probes_v):
        """Per-probe estimates of a side pass (one vmapped jvp over the probes; nothing recorded)
        and whether the pass changed the submodule's state."""
        pure, changed = side

        def one(v):
            y, jv = jax.jvp(pure, (h,), (v,))
            return _sq_norm_rows(jax.tree_util.tree_leaves(jv)[differentiated_leaf(y)])

        self.passthrough += 1
        try:
            estimates = jax.vmap(one)(probes_v)
        finally:
            self.passthrough -= 1
        return estimates, any(changed)

    def _exact(self, path, module, call, h, rest, kwargs):
        if self.adapter.is_linear(module):
            why = self.adapter.no_closed_form(module)
            if why:
                raise ValueError(f'estimator="exact" has no closed form for {path!r} '
                                 f'({type(module).__name__}): {why}. Use estimator="probe" for it')
            y = call(h, *rest, **kwargs)
            return y, jnp.sum(self._linear_response(module, h))
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
                f"needs a submodule whose call is one Dense/Conv (zero padding, __call__ not "
                f"overridden) on its input followed by one marked activation (dreg_jax.Activation, "
                f"NNXActivation or ChainzRule) giving its output; its calls were: [{made}]. "
                f"Use estimator=\"probe\" for this submodule"
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

    def _record_child(self, path, module, call, args, kwargs):
        frame = self.frames[-1]
        self.active.append(path)  # its own re-entrant calls are not children
        try:
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
        finally:
            self.active.pop()
        kind = "other" if self.adapter.no_closed_form(module) else "linear"
        frame.append(_Call(kind, module, args[0] if args else None, y))
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

    def results(self, carried: dict) -> tuple[dict, dict]:
        """``(terms, widths)`` keyed ``path`` or ``path#k``, in call order (layer order in a scan).

        ``carried`` maps ``(collection, scope path, name)`` to the values that left lifted
        transforms through variables; an entry whose carrier is missing belonged to a trace the
        transform discarded (a shape-only pass) and is dropped.
        """
        values = []
        for e in self.entries:
            if e.carrier is None:
                values.append((e, [e.value]))
            elif e.carrier in carried:
                stacked = jnp.asarray(carried[e.carrier])
                values.append((e, list(stacked.reshape(-1))))
        counts = collections.Counter()
        for e, vs in values:
            counts[e.path] += len(vs)
        seen: dict[str, int] = collections.defaultdict(int)
        terms, widths = {}, {}
        for e, vs in values:
            for v in vs:
                key = e.path
                if counts[e.path] > 1:
                    key = f"{e.path}#{seen[e.path]}"
                    seen[e.path] += 1
                terms[key], widths[key] = v, e.width
        return terms, widths


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
    """The differentiated output leaf, which must keep the batch axis."""
    index = differentiated_leaf(y)
    leaf = None if index is None else jax.tree_util.tree_leaves(y)[index]
    if leaf is None or leaf.ndim < 1 or leaf.shape[0] != batch:
        raise ValueError(
            f"submodule {path!r} must map (batch, ...) to outputs that keep the batch axis "
            f"(batch={batch}; the term covers its first floating array leaf); that leaf is "
            f"{getattr(leaf, 'shape', None) if leaf is not None else 'no floating array'}. "
            "Select a submodule that acts per example"
        )
    return leaf


def _zero_padding(padding) -> bool:
    if isinstance(padding, str):
        return padding.upper() in _ZERO_PADDINGS
    return True  # ints and explicit (low, high) pairs pad with zeros


def _closed_form_refusal(module, base_types) -> str:
    """Why a Dense/Conv (sub)class has no closed form, or '' when ``sum W^2`` is its term."""
    cls = getattr(type(module), "_dreg_original", type(module))
    base = next(b for b in base_types if isinstance(module, b))
    if cls.__call__ is not base.__call__:
        return f"{cls.__name__}.__call__ overrides {base.__name__}.__call__, so its map is not the kernel's"
    padding = getattr(module, "padding", "VALID")
    if not _zero_padding(padding):
        return (f"padding={padding!r} can send two kernel taps to one input, so "
                "||J||_F^2 is not the sum of the squared kernel")
    return ""


# ---------------------------------------------------------------------------------------
# linen
# ---------------------------------------------------------------------------------------
class _NeedParamsCarrier(Exception):
    """A selection sits in a lifted transform that does not carry ``TERMS_COLLECTION`` out."""


class _LinenAdapter:
    def __init__(self, params_carrier: bool):
        self.params_carrier = params_carrier
        self.deferred = 0  # > 0: inside a raw jax.jvp, where flax variables must not be written
        self.clones: dict[int, list] = {}  # id(nn.jvp's module) -> [call depth, capture dropped]

    @contextlib.contextmanager
    def reentered(self, module):
        state = self.clones.get(id(module))
        if state is not None:
            state[0] += 1
        try:
            yield
        finally:
            if state is not None:
                state[0] -= 1

    def capture_filter(self, base):
        """``capture_intermediates`` as the user gave it, minus the one extra ``__call__`` that the
        forward-mode pass makes on the selected module (so ``out`` equals ``apply``'s)."""
        def keep(module, name):
            state = self.clones.get(id(module))
            if state is not None and name == "__call__" and state[0] == 0 and not state[1]:
                state[1] = True  # the outermost call of nn.jvp's module returns: not the user's
                return False
            return base(module, name)
        return keep

    @staticmethod
    def is_linear(module) -> bool:
        return isinstance(module, _LINEN_LINEAR)

    @staticmethod
    def no_closed_form(module) -> str:
        return _closed_form_refusal(module, _LINEN_LINEAR)

    def prepare(self, recorder, entry, module):
        """Choose where the term's value will leave the model's apply: refuse before computing."""
        scope = module.scope
        if scope.is_mutable_collection(TERMS_COLLECTION):
            entry.carrier = (TERMS_COLLECTION, tuple(scope.path), f"t{entry.index}")
        elif self.params_carrier and scope.is_mutable_collection("params"):
            entry.carrier = ("params", tuple(scope.path), f"{_PARAM_PREFIX}{entry.index}")
        elif not self.params_carrier:
            raise _NeedParamsCarrier
        else:
            outer = "/".join(p for p in _debug_names(scope))
            raise ValueError(
                f"submodule {entry.path!r} is called inside a lifted transform ({outer}) that carries "
                f"neither the {TERMS_COLLECTION!r} nor the 'params' collection out (e.g. nn.scan with "
                f"variable_broadcast='params'), so its term cannot leave it. Add "
                f"'{TERMS_COLLECTION}': 0 to that transform's variable_axes, or select the "
                f"transformed module itself"
            )

    def store(self, recorder, entry, module, value):
        if self.deferred:  # written after the raw jvp returns its primal (see settle)
            entry.value, entry.scope = value, module.scope
            return
        collection, _, name = entry.carrier
        module.scope.put_variable(collection, name, value)

    def settle(self, entry, value):
        if entry.scope is not None:
            entry.scope.put_variable(entry.carrier[0], entry.carrier[2], value)
            entry.scope = None

    def jvp(self, module, call, h, v, rest, kwargs, *, nested):
        if _has_module_fields(module):
            # nn.jvp cannot lift modules passed as attributes (nn.Sequential, wrappers): a plain
            # jax.jvp of the call is the same product; nested terms are written once it returns.
            def raw(inp):
                return call(inp, *rest, **kwargs), nested()

            self.deferred += 1
            try:
                (y, aux), (jv, _) = jax.jvp(raw, (h,), (v,))
            finally:
                self.deferred -= 1
            return y, jv, aux

        def fn(mdl, inp):
            self.clones[id(mdl)] = [0, False]
            return mdl(inp, *rest, **kwargs)  # re-enters the selected path: runs straight through

        y, jv = nn.jvp(fn, module, (h,), (v,), {})
        return y, jv, ()

    @staticmethod
    def side_pass(module, call, rest, kwargs, key):
        """``(h -> output, changed)``: ``module`` alone as a pure function; ``changed`` collects
        whether a pass changed its state (the changes themselves are discarded)."""
        changed: list[bool] = []
        if _has_module_fields(module):  # its children's variables live in the parent's scope
            return (lambda inp: call(inp, *rest, **kwargs)), changed
        variables = module.variables
        clone = module.clone(parent=None)
        streams = sorted(module.scope.rngs)
        rngs = {name: jax.random.fold_in(key, i) for i, name in enumerate(streams)}
        before = _state_leaves(variables)

        def pure(inp):
            y, state = clone.apply(variables, inp, *rest, rngs=rngs, mutable=True, **kwargs)
            changed.append(_changed(before, _state_leaves(state)))
            return y

        return pure, changed

    @staticmethod
    def squared_kernel_response(module, ones):
        params = module.variables["params"]
        sq = {"kernel": jnp.square(params["kernel"].astype(jnp.float32))}
        if "bias" in params:
            sq["bias"] = jnp.zeros_like(params["bias"], jnp.float32)
        clone = module.clone(parent=None, dtype=jnp.float32, param_dtype=jnp.float32)
        return clone.apply({"params": sq}, ones)


def _state_leaves(variables):
    return jax.tree_util.tree_leaves({k: c for k, c in variables.items() if k != "params"})


def _changed(before, after) -> bool:
    """Whether a call replaced any state leaf (compared by identity, so it works on tracers)."""
    return len(after) != len(before) or any(a is not b for a, b in zip(before, after))


def _debug_names(scope):
    return [str(p) for p in (getattr(scope, "debug_path", None) or scope.path)]


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


def _user_mutable(kwargs):
    mutable = kwargs.pop("mutable", False)
    if mutable is None or isinstance(mutable, bool):
        return bool(mutable), mutable
    if isinstance(mutable, str):
        return True, [mutable]
    if isinstance(mutable, (list, tuple)) and all(isinstance(m, str) for m in mutable):
        return True, list(mutable)
    raise TypeError(f"jacobian_terms takes mutable=True/False or collection names, got {mutable!r}")


def _split_carried(tree, ours, path=()):
    """``({(scope path, name): value} of the leaves named ``ours(name)``, the tree without them)``."""
    carried, rest = {}, {}
    for name, value in tree.items():
        if hasattr(value, "items"):
            sub_carried, sub_rest = _split_carried(value, ours, path + (name,))
            carried.update(sub_carried)
            if sub_rest:
                rest[name] = sub_rest
        elif ours(name):
            carried[(path, name)] = value
        else:
            rest[name] = value
    return carried, rest


def _linen_apply(model, variables, x, args, kwargs, recorder_args, params_carrier):
    kwargs = dict(kwargs)
    recorder = _Recorder(*recorder_args, _LinenAdapter(params_carrier))
    user_mutable, mutable = _user_mutable(kwargs)
    capture = kwargs.get("capture_intermediates")
    if capture:
        if not user_mutable:  # apply then returns (out, state)
            user_mutable, mutable = True, []
        kwargs["capture_intermediates"] = recorder.adapter.capture_filter(
            nn.module.capture_call_intermediates if capture is True else capture)
    if mutable is True:
        ours = True
    else:
        ours = list(mutable or []) + [TERMS_COLLECTION] + (["params"] if params_carrier else [])

    def interceptor(next_fun, call_args, call_kwargs, ctx):
        if ctx.method_name != "__call__" or ctx.module.scope is None or not ctx.module.scope.path:
            return next_fun(*call_args, **call_kwargs)  # other methods, and the root model itself
        path = "/".join(ctx.module.scope.path)
        return recorder.handle(path, ctx.module, next_fun, call_args, call_kwargs)

    try:
        with nn.intercept_methods(interceptor):
            out, state = model.apply(variables, x, *args, mutable=ours, **kwargs)
    except ValueError as err:  # a term written to 'params' inside nn.scan(variable_broadcast='params')
        carried_by_params = sorted({e.path for e in recorder.entries if e.carrier and e.carrier[0] == "params"})
        if not carried_by_params or "broadcasted variable" not in str(err):
            raise
        raise ValueError(
            f"submodules {carried_by_params} are called inside a lifted transform that broadcasts "
            f"'params' (e.g. nn.scan(..., variable_broadcast='params')) and does not carry the "
            f"{TERMS_COLLECTION!r} collection, so their terms cannot leave it. Add "
            f"'{TERMS_COLLECTION}': 0 to that transform's variable_axes, or select the transformed "
            f"module itself") from None
    recorder.check_selection(recorder.seen)
    state = dict(state)
    found, _ = _split_carried(state.pop(TERMS_COLLECTION, {}), lambda name: True)
    carried = {(TERMS_COLLECTION,) + k: v for k, v in found.items()}
    if "params" in state and params_carrier:
        found, params = _split_carried(state.pop("params"), lambda n: n.startswith(_PARAM_PREFIX))
        carried.update({("params",) + k: v for k, v in found.items()})
        if len(jax.tree_util.tree_leaves(params)) != len(jax.tree_util.tree_leaves(variables.get("params", {}))):
            raise ValueError("the model created parameters during jacobian_terms (its variables miss "
                             "some of its params): pass the variables that model.init returned")
        if mutable is True:  # the user asked for every collection back
            state["params"] = params
    terms, widths = recorder.results(carried)
    if user_mutable:
        return (out, state), recorder, terms, widths
    return out, recorder, terms, widths


def _linen_terms(model, variables, x, args, kwargs, recorder_args):
    try:
        return _linen_apply(model, variables, x, args, kwargs, recorder_args, params_carrier=False)
    except _NeedParamsCarrier:
        # a scanned/vmapped stack maps 'params' (its weights are stacked): terms leave through it
        return _linen_apply(model, variables, x, args, kwargs, recorder_args, params_carrier=True)


# ---------------------------------------------------------------------------------------
# NNX
# ---------------------------------------------------------------------------------------
class _DregTerm(nnx.Variable):
    """A term computed inside an NNX lifted transform, carried out as module state."""


class _NNXAdapter:
    def __init__(self, originals):
        self.originals = originals  # id -> the model's own submodule objects (not transform copies)

    @staticmethod
    def reentered(module):
        del module
        return contextlib.nullcontext()

    @staticmethod
    def is_linear(module) -> bool:
        return isinstance(module, _NNX_LINEAR)

    @staticmethod
    def no_closed_form(module) -> str:
        return _closed_form_refusal(module, _NNX_LINEAR)

    def prepare(self, recorder, entry, module):
        if id(module) not in self.originals:  # a copy made by nnx.scan / nnx.vmap / nnx.remat
            entry.carrier = ("nnx", entry.path, f"_dreg_term_{entry.index}")

    def store(self, recorder, entry, module, value):
        if entry.carrier is None:
            entry.value = value
        else:
            setattr(module, entry.carrier[2], _DregTerm(value))

    @staticmethod
    def settle(entry, value):
        if entry.carrier is None:
            entry.value = value

    def _copy(self, graphdef, state):
        """Fresh Variables at this trace level (mutating the outer ones there is an error); its
        submodules count as the model's own (their terms are returned, not carried)."""
        copy = nnx.merge(graphdef, jax.tree_util.tree_map(lambda a: a, state))
        self.originals.update(id(m) for _, m in nnx.iter_graph(copy) if isinstance(m, nnx.Module))
        return copy

    def jvp(self, module, call, h, v, rest, kwargs, *, nested):
        graphdef, state = nnx.split(module)
        before = jax.tree_util.tree_leaves(state)
        changed = []

        def fn(inp):
            copy = self._copy(graphdef, state)
            out = _original_call(copy, call)(inp, *rest, **kwargs)
            new_state = nnx.state(copy)
            changed.append(_changed(before, jax.tree_util.tree_leaves(new_state)))
            return out, new_state, nested()

        (y, new_state, aux), (jv, _, _) = jax.jvp(fn, (h,), (v,))
        if changed[0]:  # read-only when the call changed nothing (a module closed over by jax.jit)
            nnx.update(module, new_state)
        return y, jv, aux

    def side_pass(self, module, call, rest, kwargs, key):
        del key  # NNX modules draw dropout from their own Rngs state; the copy's draws are discarded
        graphdef, state = nnx.split(module)
        before = jax.tree_util.tree_leaves(state)
        changed: list[bool] = []

        def pure(inp):
            copy = self._copy(graphdef, state)
            out = _original_call(copy, call)(inp, *rest, **kwargs)
            changed.append(_changed(before, jax.tree_util.tree_leaves(nnx.state(copy))))
            return out

        return pure, changed

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


def _original_call(copy, call):
    """``call``'s function bound to ``copy`` (the class's own ``__call__``, not the hook)."""
    return call.__func__.__get__(copy) if hasattr(call, "__func__") else call


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


def _nnx_terms(model, x, args, kwargs, recorder_args):
    modules = nnx_module_paths(model)
    recorder = _Recorder(*recorder_args, _NNXAdapter({id(m) for m in modules.values()}))
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
    carried = {}
    if any(e.carrier is not None for e in recorder.entries):
        for path, m in modules.items():
            for name in [n for n, v in vars(m).items() if isinstance(v, _DregTerm)]:
                carried[("nnx", path, name)] = getattr(m, name)[...]
                delattr(m, name)
    terms, widths = recorder.results(carried)
    return out, recorder, terms, widths


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


def _take_rows(h, rows):
    """``h[rows]``; under explicit mesh axes with the batch sharded, the rows come back
    replicated over the batch axes (every device holds the ``m`` sampled rows: the global
    batch's draw, as on one device)."""
    spec = getattr(getattr(jax.typeof(h), "sharding", None), "spec", None)
    if spec is not None and len(spec) and spec[0] is not None:
        return h.at[rows].get(out_sharding=jax.sharding.PartitionSpec(None, *spec[1:]))
    return h[rows]


def _shard_axes(x, axis_name) -> tuple:
    """Mesh axes the input varies over inside ``shard_map``: ``axis_name`` (a name or names)
    and those JAX tracks for ``x`` (``check_vma=True``), sorted."""
    given = () if axis_name is None else (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    tracked = set()
    for leaf in jax.tree_util.tree_leaves(x):
        if isinstance(leaf, (jax.Array, np.ndarray)):
            aval = jax.typeof(leaf)
            # the axes JAX tracks (check_vma=True): older JAX names them aval.vma, newer
            # aval.manual_axis_type.varying
            manual = getattr(aval, "manual_axis_type", None)
            tracked |= set(getattr(manual, "varying", None) or getattr(aval, "vma", None) or ())
    return tuple(sorted(set(given) | tracked))


def shard_key(key, x, axis_name=None):
    """The key :func:`jacobian_terms` draws from: ``key`` folded with ``axis_index(a)`` for every
    mesh axis ``a`` the input ``x`` varies over inside ``shard_map`` (module docs); ``key``
    itself outside one."""
    for name in _shard_axes(x, axis_name):
        key = jax.random.fold_in(key, jax.lax.axis_index(name))
    return key


def jacobian_terms(model, variables, x, *args, key=None, layers=None, scope: str = "layer",
                   estimator: str = "probe", num_probes: int = 1, row_fraction: float = 1.0,
                   with_widths: bool = False, axis_name=None, **kwargs):
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
      with_widths: also return each term's output width (units per example), the ``widths`` of
        ``dreg_penalty(..., scaling="width")``, from the same pass.
      axis_name: inside ``shard_map`` with ``check_vma=False``: the batch's mesh axis name (or
        names); each shard then draws its own probes and rows (:func:`shard_key`). Under
        ``check_vma=True`` JAX tells the library the axes itself.

    Returns:
      ``(out, terms)`` (``(out, terms, widths)`` with ``with_widths``): ``out`` what
      ``model.apply`` (or ``model(...)``) returns; ``terms`` a dict ``path -> scalar`` (float32)
      in call order, each :math:`\\|J\\|_F^2 / B` of that submodule's own map at the input it
      received (module docs); ``widths`` a dict ``path -> int`` with the same keys.
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
    if row_fraction < 1.0 and (estimator == "exact" or scope == "activation"):
        raise ValueError(f"row_fraction={row_fraction} samples the rows that carry probes; "
                         f"{'the exact estimator' if estimator == 'exact' else 'the activation scope'} "
                         "draws none and uses every row: leave row_fraction at 1, or use estimator=\"probe\"")
    key = jax.random.key(0) if key is None else shard_key(key, x, axis_name)
    _check_model_input(x)
    out, _, terms, widths = _run(model, variables, x, args, kwargs,
                                 (layers, scope, estimator, key, num_probes, row_fraction))
    return (out, terms, widths) if with_widths else (out, terms)


def _run(model, variables, x, args, kwargs, recorder_args):
    """The model's forward pass with a recorder: ``(out, recorder, terms, widths)``, linen or NNX."""
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise TypeError("an NNX model carries its own state: pass variables=None")
        return _nnx_terms(model, x, args, kwargs, recorder_args)
    if isinstance(model, nn.Module):
        if model.scope is not None:
            raise TypeError("pass the unbound linen module (not model.bind(...)) and its variables")
        if not hasattr(variables, "keys"):
            raise TypeError(f"variables must be the model's variable dict, got {type(variables).__name__}")
        return _linen_terms(model, variables, x, args, kwargs, recorder_args)
    raise TypeError(f"model must be a flax linen or NNX module, got {type(model).__name__}")


def term_widths(model, variables, x, *args, layers=None, scope: str = "layer",
                estimator: str = "probe", **kwargs) -> dict:
    """Output width (units per example) of every term's submodule call.

    The ``widths`` argument of ``dreg_penalty(terms, widths, scaling="width")``. For linen it
    runs on shapes only (``jax.eval_shape``); an NNX model runs one forward pass.
    ``jacobian_terms(..., with_widths=True)`` gives the same dict from the training pass itself.
    """
    recorder_args = (_check_layers(layers, scope), scope, estimator, jax.random.key(0), 1, 1.0)
    if isinstance(model, nnx.Module):
        return _run(model, variables, x, args, kwargs, recorder_args)[3]
    found = {}

    def shapes(x, *args):
        found.update(_run(model, variables, x, args, kwargs, recorder_args)[3])
        return 0

    jax.eval_shape(shapes, x, *args)
    return found
