r"""DREG terms for any Flax model (linen or NNX), without restructuring it.

:func:`jacobian_terms` runs the model's own forward pass once and, at every selected
submodule call, replaces the call by a forward-mode product that returns the submodule's
output *and* a per-layer Jacobian term from the same pass::

    out, terms = dreg_jax.jacobian_terms(model, variables, x, key=key, layers=["mlp"])
    loss = data_loss(out) + dreg_jax.dreg_penalty(terms)

What a term is. For a selected submodule :math:`f` called on a batch :math:`h` (its first
positional argument that is an array: a leading equation string, as in ``Einsum("bd,df->bf", x)``,
is held fixed like the other arguments) with output :math:`y = f(h)`, the term is

.. math:: T = \frac{1}{B}\,\|J\|_F^2, \qquad J = \frac{\partial\, \mathrm{vec}\, y}{\partial\, \mathrm{vec}\, h},

the Jacobian **of that submodule's own map on the batch** at the input it received in this
pass. For a map that acts on each example alone, :math:`J` is block diagonal and :math:`T` is
the batch mean of the per-example :math:`\|J_b\|_F^2`. For a map that mixes rows (BatchNorm in
training mode: the statistics depend on every row) :math:`T` also counts the cross-row blocks
:math:`\partial y_b / \partial h_c`: it is the Jacobian of the map the layer really computes.
For a residual block ``x + mlp(x)`` that selects ``mlp``, the term is the branch's, never
:math:`I + J`.

Tied inputs. When the same array is passed as several arguments (self-attention written
``attn(y, y)`` or ``attn(y, inputs_kv=y)``), the term is the Jacobian of the map of that array,
``y -> attn(y, y)``: the tangent goes into every argument that *is* ``h`` (the same object). This
equals the term of ``attn(y)``. ``tie_inputs=False`` varies the first array argument only
(the query path, :math:`\partial\, \mathrm{attn}(q, y) / \partial q`).

Which output a term covers. A submodule that returns a pytree (``(x, aux)``, a decoding block's
``(cache, x)``) has one array :math:`y` that the term covers, chosen by ``output=`` (a path such
as ``"1"`` for ``out[1]``, a function of the output, or a dict of those keyed by layer path) or,
by default, by this rule, which never picks a cache in silence:

1. the only floating array leaf;
2. for a tuple or list whose first element is a floating array: that element (``(x, aux)``,
   ``(x, cache)``; a ``(c, h)`` pair of arrays gives ``c``: pass ``output=`` for ``h``);
3. otherwise the one floating leaf shaped like the input :math:`h` (the hidden state of
   ``(cache, x)`` or ``{"cache": ..., "x": x}``); if there is none or more than one, the call is
   refused with the output's leaves and shapes, asking for ``output=``.

Scopes and estimators:

* ``scope="layer", estimator="probe"`` (any submodule: Dense, Conv, attention, a whole
  block): Rademacher probes :math:`v` over the whole batch through ``jax.jvp`` (``flax.linen.jvp``
  for linen), :math:`E_v\|Jv\|^2/B = T`. Probe 0 rides on the model's own pass (the output and
  :math:`Jv` come from one forward-mode pass); probes ``1..P-1`` are a side pass: one
  ``jax.vmap`` over the probes of the submodule's jvp on the same batch, so each probe sees the
  batch exactly as the model's pass did (unbiased for any ``num_probes``, row-mixing layers
  included), and nested selections inside cost linear, not quadratic, in ``num_probes``.
* ``mode`` (probe estimator): ``"forward"`` is the ``jvp`` above. ``"reverse"`` draws
  Rademacher probes :math:`u` over the covered output instead and takes ``vjp`` products,
  :math:`E_u\|J^\top u\|^2/B = \|J\|_F^2/B = T`: the same term, unbiased, differentiable for
  training (second-order reverse mode), for maps that contain a ``jax.custom_vjp`` (no
  forward-mode rule: Griffin's clipped square root). It costs the model's own call plus one side
  pass of the submodule linearized once with ``P`` backward products (``benchmarks/
  reverse_mode_cost.py``, CPU: a train step with one probe on every MLP of a small Griffin-style
  model costs 1.37x plain in reverse mode, 1.41x in forward mode), and its variance differs
  (:math:`2(\|JJ^\top\|_F^2 - \sum_i (JJ^\top)_{ii}^2)` against
  :math:`2(\|J^\top J\|_F^2 - \sum_j (J^\top J)_{jj}^2)` per probe). ``"auto"`` (the default) runs
  forward mode and, for a submodule whose map has no forward-mode rule, reverse mode (recorded
  in ``jacobian_terms``' results as any other term). ``mode="forward"`` refuses such a
  submodule, naming it and its ``custom_vjp`` functions.
* ``scope="layer", estimator="exact"`` (closed forms): a Dense or Conv alone,
  :math:`\|W\|_F^2` summed over output positions; an elementwise activation alone,
  :math:`\sum_i\sigma'(z_i)^2`; a submodule whose call is one Dense/Conv followed by one
  marked activation, :math:`\sum_{o} \sigma'(z_o)^2 \sum_{i \to o} W_{i o}^2` (the squared
  kernel's response to an all-ones input gives :math:`\sum_{i\to o} W_{io}^2` for any stride,
  zero padding, dilation or ``feature_group_count``). A Dense/Conv subclass that overrides
  ``__call__``, and a Conv whose padding is not zero padding (``"CIRCULAR"``, ``"REFLECT"``:
  two taps can reach the same input) have no closed form and are refused, as is anything else,
  with the submodule calls it made. Variables boxed with sharding metadata (``nn.Partitioned``,
  ``nn.LogicallyPartitioned``, NNX variables with ``sharding``) are read unboxed.
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
(a side pass); its other array arguments whose leading axis has length ``B`` (attention masks,
positions, a decoding cache) are taken at the same rows, as per-example data (a submodule with
another argument of ``B`` rows that are not examples needs ``row_fraction=1``), so a submodule that mixes rows through mutable state (batch statistics) is
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
(reverse mode: ``(P, *y.shape)``, ``y`` the covered output on the probed rows) and, for
``r < 1``, rows ``permutation(fold_in(k_call, 1), B)[:m]`` (see :func:`call_key`). ``nn.scan``
traces its body twice (once for shapes, discarded); the calls of the discarded trace do not
count, so the first call inside a scan body that starts the pass is call 0.

On many devices (docs/guide/many_devices.md):

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
``nn.jit`` and ``nnx.scan``, ``nnx.vmap``, ``nnx.remat`` are supported. ``nn.jit`` (a model whose
``__call__`` is jitted, as Gemma's is, or any submodule) traces again on every
``jacobian_terms`` pass, so each pass records its own terms with its own key (an eager loop
therefore compiles the jitted part on each call: jit your train step, as usual): each term leaves the
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
import collections.abc
import contextlib
import dataclasses
import inspect
import itertools
import math
import threading
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
TERM_MODES = ("auto", "forward", "reverse")
TERMS_COLLECTION = "dreg_terms"
ELEMENTWISE_MODULES = (Activation, NNXActivation, ChainzRule)
_LINEN_LINEAR = (nn.Dense, nn.Conv)
_NNX_LINEAR = (nnx.Linear, nnx.Conv)
_ZERO_PADDINGS = ("SAME", "VALID", "CAUSAL", "SAME_LOWER")
_PARAM_PREFIX = "__dreg_term_"


def call_key(key, call_index: int):
    """The key of the ``call_index``-th recorded call: probes from ``fold_in(., 0)``, rows from ``fold_in(., 1)``."""
    return jax.random.fold_in(key, call_index)


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
    index: int  # position in the recorder's entries (names its carrier variable)
    call: int = 0  # call_key index
    width: int = 0
    value: Any = None  # the value itself, when it was taken outside any lifted transform
    carrier: tuple | None = None  # (collection, scope path, name) for values carried by variables
    scope: Any = None  # linen: the scope to write a deferred value into (see _LinenAdapter.settle)


@dataclasses.dataclass(frozen=True)
class _Options:
    """What one ``jacobian_terms`` pass computes (validated by :func:`jacobian_terms`)."""

    layers: tuple
    scope: str
    estimator: str
    key: Any
    num_probes: int = 1
    row_fraction: float = 1.0
    mode: str = "auto"
    output: Any = None
    tie_inputs: bool = True


@dataclasses.dataclass
class _Site:
    """A selected call's arguments: where its input ``h`` sits and where it is passed again.

    ``h`` is the call's first argument that is an array, in the order of the submodule's
    ``__call__`` signature (positional or keyword: ``rg_lru(x=x, segment_pos=...)``); a leading
    equation string or other static value is held fixed. With ``tie_inputs``, every other argument
    that *is* the same array object (self-attention as ``attn(y, y)``) is tied to it: the term is
    the Jacobian of the map of that one array.
    """

    args: tuple
    kwargs: dict
    position: Any  # int: positional index; str: keyword name
    tied: tuple = ()

    @classmethod
    def of(cls, path, module, args, kwargs, tie_inputs):
        order = list(range(len(args))) + _keyword_order(module, kwargs)
        value = lambda loc: args[loc] if isinstance(loc, int) else kwargs[loc]  # noqa: E731
        position = next((loc for loc in order if _is_array(value(loc))), None)
        if position is None:
            kinds = ", ".join([type(a).__name__ for a in args] + [f"{k}={type(a).__name__}" for k, a in kwargs.items()])
            raise TypeError(f"submodule {path!r} was called with no array argument ({kinds or 'none'}); "
                            "jacobian_terms differentiates the first array argument: select a submodule "
                            "that takes an activation array")
        h = value(position)
        tied = tuple(loc for loc in order if loc != position and value(loc) is h) if tie_inputs else ()
        return cls(tuple(args), dict(kwargs), position, tied)

    @property
    def h(self):
        return self.args[self.position] if isinstance(self.position, int) else self.kwargs[self.position]

    def bind(self, inp):
        """``(args, kwargs)`` of the call with ``inp`` in place of ``h`` (and of its tied copies)."""
        args, kwargs = list(self.args), dict(self.kwargs)
        for loc in (self.position,) + self.tied:
            if isinstance(loc, int):
                args[loc] = inp
            else:
                kwargs[loc] = inp
        return tuple(args), kwargs

    def take_rows(self, rows, batch):
        """This call on ``rows`` of the batch: ``h`` (and its tied copies) and every other array
        argument whose leading axis has the batch's length ``batch``."""
        def take(a):
            if _is_array(a) and a.ndim >= 1 and a.shape[0] == batch:
                return _take_rows(a, rows)
            return a

        args = tuple(jax.tree_util.tree_map(take, a) for a in self.args)
        kwargs = {k: jax.tree_util.tree_map(take, a) for k, a in self.kwargs.items()}
        return dataclasses.replace(self, args=args, kwargs=kwargs)

    def calling(self, call):
        """``inp -> call(...)`` with ``inp`` bound in place of ``h``."""
        def run(inp):
            args, kwargs = self.bind(inp)
            return call(*args, **kwargs)
        return run


def _is_array(a) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype")


_SIGNATURES: dict = {}


def _keyword_order(module, kwargs) -> list:
    """Keyword arguments in the order of the submodule's ``__call__`` parameters, then the rest."""
    if not kwargs:
        return []
    cls = _original_class(module)
    if cls not in _SIGNATURES:
        try:
            _SIGNATURES[cls] = [p for p in inspect.signature(cls.__call__).parameters if p != "self"]
        except (TypeError, ValueError):
            _SIGNATURES[cls] = []
    names = [n for n in _SIGNATURES[cls] if n in kwargs]
    return names + [k for k in kwargs if k not in names]


class _Recorder:
    """State of one ``jacobian_terms`` pass: selection, options, recorded terms."""

    def __init__(self, options: _Options, adapter):
        layers = options.layers
        self.options = options
        self.paths = {l for l in layers if isinstance(l, str)}
        self.types = tuple(l for l in layers if isinstance(l, type))
        self.select_all_elementwise = not layers
        self.scope, self.estimator = options.scope, options.estimator
        self.key, self.num_probes, self.row_fraction = options.key, options.num_probes, options.row_fraction
        self.adapter = adapter
        self.entries: list[_Entry] = []
        self.calls = 0  # recorded calls so far: the index of call_key (shape-only traces reuse theirs)
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
        if self.frames and (is_elementwise(module) or self.adapter.is_linear(module)
                            or not self.selected(path, module)):
            return self._record_child(path, module, call, args, kwargs)
        if not self.selected(path, module):
            return call(*args, **kwargs)
        site = _Site.of(path, module, args, kwargs, self.options.tie_inputs)
        h = site.h
        _check_input(h, path)
        entry = _Entry(path, len(self.entries), call=self.calls)
        self.calls += 1
        self.entries.append(entry)
        self.adapter.prepare(self, entry, module)  # refuses before computing, where it must
        k_call = call_key(self.key, entry.call)
        self.active.append(path)
        try:
            if self.scope == "activation" or (self.estimator == "exact" and is_elementwise(module)):
                if not is_elementwise(module):
                    raise ValueError(
                        f'scope="activation" needs marked elementwise activations, but {path!r} is a '
                        f"{type(module).__name__}; wrap the activation as dreg_jax.Activation(fn) "
                        f"(dreg_jax.NNXActivation for NNX) or use scope=\"layer\""
                    )
                y, slope = module.value_and_derivative(*site.args, **site.kwargs)
                value = _mean_row_sum(jnp.square(slope.astype(jnp.float32)))
            elif self.estimator == "exact":
                y, value = self._exact(path, module, call, site)
            else:
                y, value = self._probe(path, module, call, site, k_call)
        finally:
            self.active.pop()
        entry.width = math.prod(_covered_output(y, h, path, self.selector(path)).leaf.shape[1:])
        self.adapter.store(self, entry, module, value)
        return y

    def selector(self, path):
        output = self.options.output
        return output.get(path) if isinstance(output, dict) else output

    # -- the probe estimator ---------------------------------------------------------------
    def _probe(self, path, module, call, site, k_call):
        mode = self.options.mode
        probed = self._probe_site(site, k_call)  # the call on the rows that carry probes
        # the submodule alone as a pure function (on the probed rows), with the state the
        # model's call is about to see
        side = self.adapter.side_pass(module, call, probed, jax.random.fold_in(k_call, 2))
        if mode == "reverse":
            y = site.calling(call)(site.h)
            return y, self._reverse(path, side, site.h, probed.h, y, k_call)
        start, calls = len(self.entries), self.calls
        try:
            with _forward_attempt():
                return self._probe_forward(path, site, probed.h, module, call, side, k_call)
        except _CustomVJPInForwardPass as err:
            # the forward pass stopped at the custom_vjp call, before any tangent met it: nothing
            # was committed (a lifted nn.jvp commits only when it returns)
            names = err.name
        except TypeError as err:  # a custom_vjp this library's hook did not see
            if not _is_custom_vjp_error(err):
                raise
            names = "a function"
        if mode == "forward":
            raise ValueError(
                f"submodule {path!r} calls a jax.custom_vjp function ({names}), which has no "
                "forward-mode (jvp) rule; use mode=\"reverse\" (or the default mode=\"auto\") for a "
                "reverse-mode probe estimate of the same term")
        del self.entries[start:]  # the nested terms of the stopped pass, recorded again
        self.calls = calls
        y = site.calling(call)(site.h)  # the model's own call, this time without a jvp
        return y, self._reverse(path, side, site.h, probed.h, y, k_call)

    def _probe_site(self, site, k_call):
        """The call that carries probes: ``site`` itself, or (``row_fraction < 1``) the call on
        ``m`` rows drawn without replacement; arguments with the batch's leading length (masks,
        positions, caches) are taken at the same rows."""
        if self.row_fraction >= 1.0:
            return site
        batch = site.h.shape[0]
        m = max(1, round(self.row_fraction * batch))
        rows = jax.random.permutation(jax.random.fold_in(k_call, 1), batch)[:m]
        return site.take_rows(rows, batch)

    def _probe_forward(self, path, site, h_probe, module, call, side, k_call):
        h, probes = site.h, self.num_probes
        v = rademacher(jax.random.fold_in(k_call, 0), (probes,) + h_probe.shape, h.dtype)
        if self.row_fraction < 1.0:
            # the side pass first: a map it cannot differentiate fails before the model's pass
            estimates, changed = self._side(side, h_probe, v, path, call_output=None)
            _refuse_changed_state(changed, path)
            y = site.calling(call)(h)
            return y, jnp.mean(estimates)
        start = len(self.entries)
        y, jv, nested = self.adapter.jvp(module, call, site, v[0],
                                         nested=lambda: tuple(e.value for e in self.entries[start:]))
        for e, value in zip(self.entries[start:], nested):  # primal values of nested terms
            self.adapter.settle(e, value)
        total = _sq_norm_rows(_covered_output(y, h, path, self.selector(path)).tangent(y, jv))
        if probes > 1:
            estimates, _ = self._side(side, h, v[1:], path, call_output=y)
            total = total + jnp.sum(estimates)
        return y, total / probes

    def _side(self, side, h, probes_v, path, call_output):
        """Per-probe estimates of a forward side pass (one vmapped jvp over the probes; nothing
        recorded) and whether the pass changed the submodule's state."""
        pure, changed = side
        covered = None if call_output is None else _covered_output(call_output, h, path, self.selector(path))

        def one(v):
            y, jv = jax.jvp(pure, (h,), (v,))
            c = covered or _covered_output(y, h, path, self.selector(path))
            return _sq_norm_rows(c.tangent(y, jv))

        self.passthrough += 1
        try:
            estimates = jax.vmap(one)(probes_v)
        finally:
            self.passthrough -= 1
        return estimates, any(changed)

    def _reverse(self, path, side, h, h_probe, y, k_call):
        """Hutchinson through ``vjp``: ``E ||J^T u||^2 = ||J||_F^2`` for Rademacher ``u`` over the
        covered output; one side pass linearized once, ``P`` vjps (vmapped)."""
        covered = _covered_output(y, h, path, self.selector(path))
        pure, changed = side
        self.passthrough += 1
        try:
            try:
                out, vjp_fn = jax.vjp(lambda inp: covered.pick(pure(inp)), h_probe)
            except TypeError as err:
                raise ValueError(f"submodule {path!r}: its map has no forward-mode rule and reverse "
                                 f"mode failed too: {err}") from err
            u = rademacher(jax.random.fold_in(k_call, 0), (self.num_probes,) + out.shape, out.dtype)
            grads = jax.vmap(lambda ui: vjp_fn(ui)[0])(u)
        finally:
            self.passthrough -= 1
        if self.row_fraction < 1.0:
            _refuse_changed_state(any(changed), path)
        return jnp.mean(jax.vmap(_sq_norm_rows)(grads))

    # -- the exact estimator ---------------------------------------------------------------
    def _exact(self, path, module, call, site):
        h = site.h
        if self.adapter.is_linear(module):
            why = self.adapter.no_closed_form(module)
            if why:
                raise ValueError(f'estimator="exact" has no closed form for {path!r} '
                                 f'({type(module).__name__}): {why}. Use estimator="probe" for it')
            y = call(*site.args, **site.kwargs)
            return y, jnp.sum(self._linear_response(module, h))
        self.frames.append([])
        try:
            y = call(*site.args, **site.kwargs)
        finally:
            calls = self.frames.pop()
        kinds = [c.kind for c in calls]
        if (kinds != ["linear", "activation"] or calls[1].inputs is not calls[0].output
                or y is not calls[1].output or calls[0].inputs is not h):
            made = ", ".join(f"{type(c.module).__name__}" for c in calls)
            made = (f"the submodule calls it made were: [{made}]" if made else
                    f"it calls no submodule the library sees (its map is its own code, e.g. jnp.einsum"
                    f"{'' if self.adapter.sees_every_call else '; NNX frames see Linear, Conv and marked activations only'})")
            raise ValueError(
                f'estimator="exact" has no closed form for {path!r} ({type(module).__name__}): it '
                f"needs a submodule whose call is one Dense/Conv (zero padding, __call__ not "
                f"overridden) on its input followed by one marked activation (dreg_jax.Activation, "
                f"NNXActivation or ChainzRule) giving its output; {made}. "
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
        kind = "linear" if self.adapter.is_linear(module) and not self.adapter.no_closed_form(module) else "other"
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
    if not jnp.issubdtype(h.dtype, jnp.floating) or h.ndim < 1:
        hint = (" (token ids? select the submodules after the embedding lookup)"
                if jnp.issubdtype(h.dtype, jnp.integer) else "")
        raise TypeError(
            f"submodule {path!r} receives a {h.dtype} array of shape {tuple(h.shape)} as its first "
            f"array argument; a Jacobian needs a floating (batch, ...) array there{hint}"
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


@dataclasses.dataclass
class _Covered:
    """The output a term covers: ``pick(output tree) -> array`` and that array (``leaf``).

    ``structural`` pickers (a leaf index or a path) index a tangent tree the same way as the
    output; a user's function is pushed through with ``jax.jvp``.
    """

    pick: Any
    leaf: Any
    structural: bool = True

    def tangent(self, y, jv):
        if self.structural:
            return self.pick(jv)
        return jax.jvp(self.pick, (y,), (jv,))[1]


def _floating_leaves(tree):
    """``[(index in tree_leaves order, key path string, leaf)]`` of the floating array leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(i, jax.tree_util.keystr(p), leaf) for i, (p, leaf) in enumerate(flat)
            if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)]


def _leaf_picker(index):
    return lambda tree: jax.tree_util.tree_leaves(tree)[index]


def _path_picker(selector):
    """``output="1/k"`` or ``output=1``: index the output by keys, attribute names and positions."""
    steps = [selector] if isinstance(selector, int) else [s for s in str(selector).split("/") if s]

    def pick(tree):
        for step in steps:
            if isinstance(tree, collections.abc.Mapping):
                tree = tree[step if step in tree else str(step)]
            elif isinstance(tree, (tuple, list)):
                tree = tree[int(step)]
            else:
                tree = getattr(tree, str(step))
        return tree
    return pick


def default_output(y, h):
    """Index (``tree_leaves`` order) of the output a term covers by default, or None (ambiguous).

    1. one floating array leaf: it;
    2. a tuple/list whose first element is a floating array: that element (``(x, aux)``,
       ``(x, cache)``);
    3. otherwise the one floating leaf laid out like the input (``h``'s shape): the hidden
       state of ``(cache, x)`` or ``{"cache": ..., "x": x}``.
    """
    leaves = _floating_leaves(y)
    if len(leaves) == 1:
        return leaves[0][0]
    if isinstance(y, (tuple, list)) and y and any(leaf is y[0] for _, _, leaf in leaves):
        return next(i for i, _, leaf in leaves if leaf is y[0])
    same = [i for i, _, leaf in leaves if tuple(leaf.shape) == tuple(h.shape)]
    return same[0] if len(same) == 1 else None


def _covered_output(y, h, path, selector) -> _Covered:
    """What the term of ``path`` covers in its output ``y`` (``output=`` or the default rule)."""
    batch = h.shape[0]
    if selector is None:
        index = default_output(y, h)
        if index is None:
            listing = ", ".join(f"out{k} {tuple(leaf.shape)}" for _, k, leaf in _floating_leaves(y)) or "none"
            raise ValueError(
                f"submodule {path!r} returns several floating arrays ({listing}) and none is the one "
                "its term covers by rule (a tuple's first element, else the one shaped like its input "
                f"{tuple(h.shape)}); pass output= (e.g. output=\"1\" for out[1], output={{{path!r}: "
                "lambda out: out[1]}}) to say which output's Jacobian to take")
        covered = _Covered(_leaf_picker(index), jax.tree_util.tree_leaves(y)[index])
    elif callable(selector) and not isinstance(selector, (str, int)):
        covered = _Covered(selector, selector(y), structural=False)
    elif isinstance(selector, (str, int)):
        picker = _path_picker(selector)
        try:
            leaf = picker(y)
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
            raise ValueError(f"output={selector!r} selects nothing in the output of {path!r} "
                             f"({jax.tree_util.tree_structure(y)}): {err!r}") from None
        covered = _Covered(picker, leaf)
    else:
        raise TypeError(f"output= takes a path (str or int), a function of the submodule's output, or a "
                        f"dict of those keyed by layer path; got {type(selector).__name__} for {path!r}")
    leaf = covered.leaf
    if (not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.inexact) or leaf.ndim < 1
            or leaf.shape[0] != batch):
        raise ValueError(
            f"submodule {path!r} must map (batch, ...) to outputs that keep the batch axis "
            f"(batch={batch}); the output its term covers is "
            f"{getattr(leaf, 'dtype', type(leaf).__name__)} {tuple(getattr(leaf, 'shape', ()))}. "
            "Select a submodule that acts per example, or pass output= to choose another output")
    return covered


def _refuse_changed_state(changed, path):
    if changed:
        raise ValueError(
            f"row_fraction < 1 runs {path!r} a second time on the sampled rows, and that pass "
            "changed its mutable state (e.g. batch statistics): its map on the sampled rows "
            "is not its map on the batch; use row_fraction=1 for it"
        )


def _is_custom_vjp_error(err) -> bool:
    text = str(err)
    return "custom_vjp" in text and ("jvp" in text or "forward-mode" in text)


class _CustomVJPInForwardPass(Exception):
    """A ``jax.custom_vjp`` function was called inside a forward-mode term's pass."""

    def __init__(self, name):
        super().__init__(name)
        self.name = name


_FORWARD_ATTEMPTS = threading.local()  # .depth: forward-mode terms being computed in this thread


@contextlib.contextmanager
def _forward_attempt():
    """While a forward-mode term is computed, a ``jax.custom_vjp`` call stops it (it has no jvp
    rule; a traced jvp would fail only later, at lowering or under vmap)."""
    _install_custom_vjp_hook()
    _FORWARD_ATTEMPTS.depth = getattr(_FORWARD_ATTEMPTS, "depth", 0) + 1
    try:
        yield
    finally:
        _FORWARD_ATTEMPTS.depth -= 1


def _install_custom_vjp_hook():
    """Wraps ``jax.custom_vjp.__call__`` once: outside a forward-mode term it only calls through."""
    cls = jax.custom_vjp
    if getattr(cls.__call__, "_dreg_hook", False):
        return
    original = cls.__call__

    def __call__(self, *args, **kwargs):
        if getattr(_FORWARD_ATTEMPTS, "depth", 0):
            raise _CustomVJPInForwardPass(getattr(self, "__name__", None) or type(self).__name__)
        return original(self, *args, **kwargs)

    __call__._dreg_hook = True
    cls.__call__ = __call__


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
    sees_every_call = True  # the interceptor sees every submodule call (exact frames list them)

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

    def jvp(self, module, call, site, v, *, nested):
        h = site.h
        if _has_module_fields(module):
            # nn.jvp cannot lift modules passed as attributes (nn.Sequential, wrappers): a plain
            # jax.jvp of the call is the same product; nested terms are written once it returns.
            def raw(inp):
                return site.calling(call)(inp), nested()

            self.deferred += 1
            try:
                (y, aux), (jv, _) = jax.jvp(raw, (h,), (v,))
            finally:
                self.deferred -= 1
            return y, jv, aux

        def fn(mdl, inp):
            self.clones[id(mdl)] = [0, False]
            return site.calling(mdl)(inp)  # re-enters the selected path: runs straight through

        y, jv = nn.jvp(fn, module, (h,), (v,), {})
        return y, jv, ()

    @staticmethod
    def side_pass(module, call, site, key):
        """``(h -> output, changed)``: ``module`` alone as a pure function; ``changed`` collects
        whether a pass changed its state (the changes themselves are discarded)."""
        changed: list[bool] = []
        if _has_module_fields(module):  # its children's variables live in the parent's scope
            return site.calling(call), changed
        # the variables as they are now (a snapshot: terms written later are not its state)
        variables = {c: v for c, v in module.variables.items() if c != TERMS_COLLECTION}
        clone = module.clone(parent=None)
        streams = sorted(module.scope.rngs)
        rngs = {name: jax.random.fold_in(key, i) for i, name in enumerate(streams)}
        before = _state_leaves(variables)

        def pure(inp):
            args, kwargs = site.bind(inp)
            y, state = clone.apply(variables, *args, rngs=rngs, mutable=True, **kwargs)
            changed.append(_changed(before, _state_leaves(state)))
            return y

        return pure, changed

    @staticmethod
    def squared_kernel_response(module, ones):
        params = nn.meta.unbox(module.variables["params"])  # nn.Partitioned, LogicallyPartitioned
        sq = {"kernel": jnp.square(params["kernel"].astype(jnp.float32))}
        if "bias" in params:
            sq["bias"] = jnp.zeros_like(params["bias"], jnp.float32)
        clone = module.clone(parent=None, dtype=jnp.float32, param_dtype=jnp.float32)
        return clone.apply({"params": sq}, ones)


def _state_leaves(variables):
    """State leaves other than params and the terms this library carries out."""
    return jax.tree_util.tree_leaves({k: _without_carried(c) for k, c in variables.items()
                                      if k not in ("params", TERMS_COLLECTION)})


def _without_carried(tree):
    if not hasattr(tree, "items"):
        return tree
    return {k: _without_carried(v) for k, v in tree.items() if not str(k).startswith(_PARAM_PREFIX)}


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


_PASSES = itertools.count()
_LINEN_ACTIVE: list = []


@contextlib.contextmanager
def _active(stack, recorder):
    stack.append(recorder)
    try:
        yield
    finally:
        stack.pop()


class _ShapeTraceCounter:
    """Stands in for ``partial_eval`` inside ``flax.core.axes_scan``: ``nn.scan`` traces its body
    once for shapes (``trace_to_jaxpr_nounits``, discarded) before the real ``lax.scan`` trace.
    Calls recorded in that shape trace give back their ``call_key`` indices, so the kept trace's
    calls get the indices the docs promise (the k-th call of the pass, from 0)."""

    def __init__(self, pe):
        self._pe = pe

    def __getattr__(self, name):
        return getattr(self._pe, name)

    def trace_to_jaxpr_nounits(self, *args, **kwargs):
        recorder = _LINEN_ACTIVE[-1] if _LINEN_ACTIVE else None
        calls = None if recorder is None else recorder.calls
        try:
            return self._pe.trace_to_jaxpr_nounits(*args, **kwargs)
        finally:
            if recorder is not None:
                recorder.calls = calls


def _install_scan_shape_trace_hook():
    from flax.core import axes_scan  # noqa: PLC0415

    pe = getattr(axes_scan, "pe", None)
    if pe is not None and not isinstance(pe, _ShapeTraceCounter) and hasattr(pe, "trace_to_jaxpr_nounits"):
        axes_scan.pe = _ShapeTraceCounter(pe)


def _linen_apply(model, variables, x, args, kwargs, options, params_carrier):
    kwargs = dict(kwargs)
    recorder = _Recorder(options, _LinenAdapter(params_carrier))
    user_mutable, mutable = _user_mutable(kwargs)
    capture = kwargs.get("capture_intermediates")
    if capture:
        if not user_mutable:  # apply then returns (out, state)
            user_mutable, mutable = True, []
        kwargs["capture_intermediates"] = recorder.adapter.capture_filter(
            nn.module.capture_call_intermediates if capture is True else capture)
    # A collection name no variable has, unique to this pass: it makes the pass's mutability
    # differ from every earlier pass's, so an nn.jit inside the model traces again (records this
    # pass's terms with this pass's key) instead of replaying a program traced for another pass.
    fresh = f"__dreg_pass_{next(_PASSES)}"
    if mutable is True:
        ours = nn.DenyList(fresh)
    else:
        ours = list(mutable or []) + [TERMS_COLLECTION, fresh] + (["params"] if params_carrier else [])

    def interceptor(next_fun, call_args, call_kwargs, ctx):
        if ctx.method_name != "__call__" or ctx.module.scope is None or not ctx.module.scope.path:
            return next_fun(*call_args, **call_kwargs)  # other methods, and the root model itself
        path = "/".join(ctx.module.scope.path)
        return recorder.handle(path, ctx.module, next_fun, call_args, call_kwargs)

    _install_scan_shape_trace_hook()
    try:
        with nn.intercept_methods(interceptor), _active(_LINEN_ACTIVE, recorder):
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


def _linen_terms(model, variables, x, args, kwargs, options):
    try:
        return _linen_apply(model, variables, x, args, kwargs, options, params_carrier=False)
    except _NeedParamsCarrier:
        # a scanned/vmapped stack maps 'params' (its weights are stacked): terms leave through it
        return _linen_apply(model, variables, x, args, kwargs, options, params_carrier=True)


# ---------------------------------------------------------------------------------------
# NNX
# ---------------------------------------------------------------------------------------
class _DregTerm(nnx.Variable):
    """A term computed inside an NNX lifted transform, carried out as module state."""


class _NNXAdapter:
    sees_every_call = False  # only Linear, Conv, marked activations and selections are hooked

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

    def jvp(self, module, call, site, v, *, nested):
        h = site.h
        graphdef, state = nnx.split(module)
        before = jax.tree_util.tree_leaves(state)
        changed = []

        def fn(inp):
            copy = self._copy(graphdef, state)
            out = site.calling(_original_call(copy, call))(inp)
            new_state = nnx.state(copy)
            changed.append(_changed(before, jax.tree_util.tree_leaves(new_state)))
            return out, new_state, nested()

        (y, new_state, aux), (jv, _, _) = jax.jvp(fn, (h,), (v,))
        if changed[0]:  # read-only when the call changed nothing (a module closed over by jax.jit)
            nnx.update(module, new_state)
        return y, jv, aux

    def side_pass(self, module, call, site, key):
        del key  # NNX modules draw dropout from their own Rngs state; the copy's draws are discarded
        graphdef, state = nnx.split(module)
        before = jax.tree_util.tree_leaves(state)
        changed: list[bool] = []

        def pure(inp):
            copy = self._copy(graphdef, state)
            out = site.calling(_original_call(copy, call))(inp)
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


def _nnx_terms(model, x, args, kwargs, options):
    modules = nnx_module_paths(model)
    recorder = _Recorder(options, _NNXAdapter({id(m) for m in modules.values()}))
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
        with _active(_NNX_ACTIVE, recorder):
            out = model(x, *args, **kwargs)
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
                   mode: str = "auto", output=None, tie_inputs: bool = True,
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
      mode: how the probe estimator differentiates: ``"forward"`` (``jvp``, probes over the
        input), ``"reverse"`` (``vjp``, probes over the output, E ||J^T u||^2 = ||J||_F^2,
        for maps with a ``jax.custom_vjp``), or ``"auto"`` (forward, and reverse for a submodule
        whose map has no forward-mode rule). Same term, same expectation (module docs).
      output: which output a term covers, for submodules that return several arrays: a path
        (``"1"`` for ``out[1]``, ``"0/x"`` for ``out[0]["x"]``, or an int), a function of the
        output returning the array, or a dict of those keyed by layer path. None: the rule in
        the module docs, which refuses an ambiguous output rather than guess.
      tie_inputs: the same array passed as several arguments (self-attention ``attn(y, y)``)
        varies in all of them (the map of that array); False: only the first array argument
        varies (the query path).
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
    check_choice("mode", mode, TERM_MODES)
    if mode != "auto" and (estimator == "exact" or scope == "activation"):
        raise ValueError(f'mode="{mode}" chooses how the probe estimator differentiates; the '
                         f"{'exact estimator' if estimator == 'exact' else 'activation scope'} "
                         "takes closed forms: leave mode=\"auto\"")
    _check_output_option(output)
    key = jax.random.key(0) if key is None else shard_key(key, x, axis_name)
    _check_model_input(x)
    options = _Options(layers, scope, estimator, key, num_probes, row_fraction, mode, output, bool(tie_inputs))
    out, recorder, terms, widths = _run(model, variables, x, args, kwargs, options)
    if isinstance(output, dict):
        unknown = sorted(set(output) - {e.path for e in recorder.entries})
        if unknown:
            raise ValueError(f"output= names {unknown}, which are no selected call's path; the "
                             f"selected calls are: {sorted({e.path for e in recorder.entries})}")
    return (out, terms, widths) if with_widths else (out, terms)


def _check_output_option(output):
    if output is None or isinstance(output, (str, int)) or callable(output):
        return
    if isinstance(output, dict):
        for path, selector in output.items():
            if not isinstance(path, str):
                raise TypeError(f"output= dict keys are layer paths (str), got {path!r}")
            _check_output_option(selector) if not isinstance(selector, dict) else None
            if isinstance(selector, dict):
                raise TypeError(f"output={{{path!r}: ...}} takes a path or a function, not a dict")
        return
    raise TypeError(f"output= takes a path (str or int), a function of the submodule's output, or a "
                    f"dict of those keyed by layer path; got {type(output).__name__}")


def _run(model, variables, x, args, kwargs, options):
    """The model's forward pass with a recorder: ``(out, recorder, terms, widths)``, linen or NNX."""
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise TypeError("an NNX model carries its own state: pass variables=None")
        return _nnx_terms(model, x, args, kwargs, options)
    if isinstance(model, nn.Module):
        if model.scope is not None:
            raise TypeError("pass the unbound linen module (not model.bind(...)) and its variables")
        if not hasattr(variables, "keys"):
            raise TypeError(f"variables must be the model's variable dict, got {type(variables).__name__}")
        return _linen_terms(model, variables, x, args, kwargs, options)
    raise TypeError(f"model must be a flax linen or NNX module, got {type(model).__name__}")


def term_widths(model, variables, x, *args, layers=None, scope: str = "layer",
                estimator: str = "probe", output=None, tie_inputs: bool = True, **kwargs) -> dict:
    """Output width (units per example) of every term's submodule call.

    The ``widths`` argument of ``dreg_penalty(terms, widths, scaling="width")``. For linen it
    runs on shapes only (``jax.eval_shape``); an NNX model runs one forward pass.
    ``jacobian_terms(..., with_widths=True)`` gives the same dict from the training pass itself.
    """
    options = _Options(_check_layers(layers, scope), scope, estimator, jax.random.key(0), output=output,
                       tie_inputs=tie_inputs)
    if isinstance(model, nnx.Module):
        return _run(model, variables, x, args, kwargs, options)[3]
    found = {}
    arrays = [i for i, a in enumerate(args) if hasattr(a, "shape") and hasattr(a, "dtype")]

    def shapes(x, *traced):
        full = list(args)  # flags such as decode=True stay Python values, arrays become shapes
        for i, a in zip(arrays, traced):
            full[i] = a
        found.update(_run(model, variables, x, tuple(full), kwargs, options)[3])
        return 0

    jax.eval_shape(shapes, x, *[args[i] for i in arrays])
    return found
