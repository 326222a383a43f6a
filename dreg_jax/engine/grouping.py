r"""Which runs share a compiled program: the engine's grouping cost model, per backend.

Runs whose config differs only in numbers (seed, learning rate, strength, fraction, noise)
always share a program: those numbers are traced :class:`~dreg_jax.engine.RunHParams`. Runs
that differ in their **activation** or **regularizer** can share one too
(:class:`dreg_jax.training.config.Fold`): the run's choice becomes a traced index, the
built-in MLP computes every folded activation and selects one, and the train step computes
every folded loss *branch* and selects one (:func:`dreg_jax.training.train.loss_branches`;
no regularizer, weight decay and DREG share the model's own pass, so they cost one branch).
What cannot share a program: different datasets (shapes), spectral normalization and the
coherent optimizer (other model or optimizer state), and other structural fields (widths,
epochs, batch size, schedules).

Folding saves compilations but makes every run of the program compute every folded branch.
Merging two groups :math:`A` and :math:`B` (``n`` runs each, ``s`` optimizer steps per run)
is worth it when the compile time it saves exceeds the compute it adds (:math:`t_\text{step}`
is the larger of a per-backend constant and a per-FLOP rate times the model's forward FLOPs,
:func:`forward_flops`):

.. math::
    t_\text{compile} \;>\; s \, t_\text{step}\,\big[(n_A + n_B)\,c(A \cup B) - n_A c(A) - n_B c(B)\big],

with :math:`c(S)` the per-step cost of a program holding ``S``, relative to one plain step:
the sum over its loss branches of the branch's :attr:`Regularizer.step_cost` (the largest of
the kinds sharing a branch) times :math:`1 + a\,(|\text{activations}| - 1)` for the folded
activations. :math:`t_\text{compile}`, :math:`t_\text{step}` and :math:`a` are per-backend
constants (:data:`BACKEND_COSTS`, measured with ``benchmarks/study_throughput.py``). On a CPU a
vmapped step costs about as much per run as an unvectorized one, so folding the expensive
penalties (IGPen, Jacobian) into the cheap runs would multiply their compute, while folding
activations and the shared-pass kinds is nearly free. On a GPU a block of runs costs about the
same whatever it computes (the step is latency-bound), so everything foldable is folded.
Greedy: the pair with the largest saving is merged first, until no merge saves time.

``EngineOptions.fold`` overrides the model: ``"none"`` (one program per activation and
regularizer, the engine's layout before folding), ``"all"`` (everything foldable),
``"activations"`` (one program per regularizer family holding a fixed set of activations,
``EngineOptions.fold_activations``, whatever runs are pending: a study that adds runs in rounds
reuses the same compiled programs in every round; a family is the kinds that share a loss
branch, i.e. no regularizer, weight decay and DREG from the model's pass, or one other kind).

Results do not depend on the grouping: a run's selected branch is bit for bit the code it
runs unfolded (tested: ``tests/test_grouping.py``).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping

import jax

from dreg_jax.engine.buckets import Bucket
from dreg_jax.training.config import Fold, TrainConfig
from dreg_jax.training.regularizers import get_regularizer
from dreg_jax.training.train import build_model, loss_branches

FOLD_MODES = ("auto", "none", "all", "activations")
#: EngineOptions.shape_buckets: which datasets share a padded program (see plan_buckets)
BUCKET_MODES = ("auto", "none", "all")


@dataclasses.dataclass(frozen=True)
class BackendCosts:
    """Per-backend constants of the grouping cost model (see the module docstring)."""

    compile_seconds: float  # compiling one study-shaped program
    step_seconds: float  # one run's plain optimizer step inside a vmapped block (at least)
    activation_cost: float  # extra step cost per additional folded activation (relative)
    seconds_per_flop: float  # a step's time per forward-pass FLOP, for models bigger than the study's
    # a run's time per padded training row per epoch (the epoch's shuffle sorts every row of
    # the bucket, padding included): what padding the rows costs (dreg_jax.engine.buckets)
    row_seconds: float = 0.0


#: Measured on the 2-core CPU of the CI machine (study shapes: MLP 2x64, batch 64; fast-compile
#: flags) and on one H100 (the issue's figures: a 4,000-run block of 1,260 steps in 2.1 s).
BACKEND_COSTS: dict[str, BackendCosts] = {
    "cpu": BackendCosts(compile_seconds=5.0, step_seconds=1.1e-4, activation_cost=0.15, seconds_per_flop=1.2e-10,
                        row_seconds=4.4e-7),
    "gpu": BackendCosts(compile_seconds=8.0, step_seconds=4e-7, activation_cost=0.05, seconds_per_flop=4e-13,
                        row_seconds=1e-9),
    "tpu": BackendCosts(compile_seconds=8.0, step_seconds=4e-7, activation_cost=0.05, seconds_per_flop=4e-13,
                        row_seconds=1e-9),
}


def forward_flops(config: TrainConfig, num_features: int, num_classes: int) -> float | None:
    """XLA's FLOP count of one forward pass of the config's model on a batch (None if unknown).

    Lowered, not compiled (well under a second). Scales the cost model's step time: the study's
    MLP step is overhead-bound (``step_seconds``), a transformer's is compute-bound
    (``seconds_per_flop`` x FLOPs; 64 tokens x 2 blocks of width 64 is ~500x the MLP).
    """
    try:
        model = build_model(config, num_classes)
        x = jax.ShapeDtypeStruct((config.batch_size, num_features), jax.numpy.float32)
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
        cost = jax.jit(model.apply).lower(variables, x).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) if cost and cost.get("flops") else None
    except Exception:  # noqa: BLE001 - an estimate only: fall back to the backend's constant
        return None


def backend_costs(backend: str | None = None) -> BackendCosts:
    backend = backend or jax.default_backend()
    return BACKEND_COSTS.get(backend, BACKEND_COSTS["gpu"])


def program_cost(config: TrainConfig, activations, regularizers, costs: BackendCosts | None = None) -> float:
    """Relative per-step cost of one run in a program folding these choices."""
    folded = dataclasses.replace(config, fold=Fold(tuple(activations), tuple(regularizers)))
    branches = loss_branches(folded)
    cost = sum(max(get_regularizer(k).step_cost for k in kinds) for kinds in branches)
    extra = sum(2.0 if a == "chainzrule" else 1.0 for a in list(activations)[1:])
    return cost * (1.0 + (costs or backend_costs()).activation_cost * extra) if activations else cost


def _greedy(groups, cost, counts, saving_per_merge, step_seconds):
    """Merges groups (lists of choices) while a merge saves time; see the module docstring."""
    groups = [tuple(g) for g in groups]
    while len(groups) > 1:
        best, best_gain = None, 0.0
        for a, b in itertools.combinations(range(len(groups)), 2):
            ga, gb = groups[a], groups[b]
            na, nb = sum(counts[c] for c in ga), sum(counts[c] for c in gb)
            extra = (na + nb) * cost(ga + gb) - na * cost(ga) - nb * cost(gb)
            gain = saving_per_merge - extra * step_seconds
            if gain > best_gain:
                best, best_gain = (a, b), gain
        if best is None:
            break
        a, b = best
        groups = [g for i, g in enumerate(groups) if i not in best] + [groups[a] + groups[b]]
    return groups


def plan_folds(config: TrainConfig, run_counts: Mapping[tuple[str, str], int], steps_per_run: int,
               mode: str = "auto", backend: str | None = None, flops: float | None = None,
               fold_activations: tuple = ()) -> list[Fold]:
    """The programs for runs of one structure: a :class:`Fold` per program.

    Args:
      config: the shared structure (activation and regularizer kind are ignored).
      run_counts: ``(activation, regularizer) -> number of runs``.
      steps_per_run: optimizer steps of one run (epochs x steps per epoch).
      mode: ``"auto"`` (the cost model), ``"none"``, ``"all"`` or ``"activations"``.
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"`` (default: JAX's default backend).
      flops: the model's forward FLOPs per batch (:func:`forward_flops`); the step time is
        ``max(step_seconds, seconds_per_flop * flops)``.

    Returns:
      Folds that cover every ``(activation, regularizer)`` pair exactly once; a program's runs
      are the pairs in ``itertools.product(fold.activations, fold.regularizers)`` that occur.
    """
    if mode not in FOLD_MODES:
        raise ValueError(f"fold must be one of {', '.join(FOLD_MODES)}, got {mode!r}")
    costs = backend_costs(backend)
    activations = list(dict.fromkeys(a for a, _ in run_counts))
    kinds = list(dict.fromkeys(k for _, k in run_counts))
    foldable = [k for k in kinds if get_regularizer(k).foldable]
    singles = [(k,) for k in kinds if k not in foldable]
    act_counts = {a: sum(n for (x, _), n in run_counts.items() if x == a) for a in activations}
    kind_counts = {k: sum(n for (_, x), n in run_counts.items() if x == k) for k in kinds}
    can_fold_activations = not config.model.is_custom
    fixed = tuple(fold_activations)
    if mode == "activations":
        missing = [a for a in activations if a not in fixed]
        if not fixed or missing or not can_fold_activations:
            raise ValueError(f"fold='activations' needs EngineOptions.fold_activations to list every activation "
                             f"of the runs (built-in MLP only); missing: {missing or list(activations)}")
        # one program per regularizer family: the kinds whose loss is the model's own pass (no
        # regularizer, weight decay, DREG from the pass) share one branch, the rest keep theirs
        family = list(loss_branches(dataclasses.replace(config, fold=Fold((), tuple(foldable))))) if foldable else []
        act_groups, kind_groups = [fixed], family + singles
    elif mode == "none":
        act_groups, kind_groups = [(a,) for a in activations], [(k,) for k in kinds]
    elif mode == "all":
        act_groups = [tuple(activations)] if can_fold_activations else [(a,) for a in activations]
        kind_groups = ([tuple(foldable)] if foldable else []) + singles
    else:
        step_seconds = max(costs.step_seconds, costs.seconds_per_flop * (flops or 0.0))
        steps = steps_per_run * step_seconds
        # kinds that share a loss branch (the model's pass) cost one branch: start them together
        start = list(loss_branches(dataclasses.replace(config, fold=Fold((), tuple(foldable))))) if foldable else []
        kind_groups = _greedy(start, lambda g: program_cost(config, (), g, costs), kind_counts,
                              costs.compile_seconds * max(1, len(activations)), steps) + singles
        act_groups = ([(a,) for a in activations] if not can_fold_activations else
                      _greedy([(a,) for a in activations], lambda g: program_cost(config, g, ("none",), costs),
                              act_counts, costs.compile_seconds * len(kind_groups), steps))
    folds = []
    for acts, regs in itertools.product(act_groups, kind_groups):
        if any((a, k) in run_counts for a in acts for k in regs):
            present_acts = (fixed if mode == "activations" else  # the same program whatever is pending
                            tuple(a for a in activations if a in acts and any((a, k) in run_counts for k in regs)))
            present_regs = tuple(k for k in kinds if k in regs and any((a, k) in run_counts for a in acts))
            folds.append(Fold(present_acts, present_regs))
    return folds


def fold_config(config: TrainConfig, fold: Fold) -> TrainConfig:
    """The program config of ``fold``: its first choices as the config's own, and the fold
    itself when it holds more than one choice of either (else ``fold=None``, the unfolded
    program)."""
    model = dataclasses.replace(config.model, activation=fold.activations[0]) if fold.activations else config.model
    regularizer = dataclasses.replace(config.regularizer, kind=fold.regularizers[0])
    keep = Fold(fold.activations if len(fold.activations) > 1 else (),
                fold.regularizers if len(fold.regularizers) > 1 else ())
    return dataclasses.replace(config, model=model, regularizer=regularizer,
                               fold=keep if (keep.activations or keep.regularizers) else None)


def _forward_macs(config: TrainConfig, bucket: Bucket) -> int:
    widths = [bucket.features, *config.model.hidden, bucket.classes]
    return sum(a * b for a, b in zip(widths, widths[1:]))


def padded_run_seconds(config: TrainConfig, bucket: Bucket, steps: int, epochs: int, eval_rows: int = 0,
                       costs: BackendCosts | None = None) -> float:
    r"""Runs' compute at ``bucket``'s shapes, by the cost model: ``steps`` optimizer steps at
    :math:`\max(t_\text{step}, r \cdot 2 B \cdot \text{MACs})`, and per epoch an evaluation at
    :math:`\max(t_\text{step}, r \cdot 2\,\text{rows} \cdot \text{MACs})` (``eval_rows``: the
    true test and validation rows summed over the epochs), with MACs the built-in MLP's
    multiply-adds per example at the padded features and classes, :math:`r` the per-FLOP rate
    and :math:`B` the batch size. The steps and the evaluated rows are the runs' own (padding
    rows never enter a batch, and a padded split is scored in chunks up to its true rows,
    :func:`dreg_jax.engine.run.evaluate_rows`); padding the features and classes costs in every
    step, and padding the training rows costs :attr:`BackendCosts.row_seconds` per row and epoch
    (each epoch's shuffle sorts the bucket's rows; measured on the 2-core CPU: 32 rows padded to
    1,078 doubled a pima run's time)."""
    costs = costs or backend_costs()
    macs = _forward_macs(config, bucket)
    step = max(costs.step_seconds, costs.seconds_per_flop * 2 * config.batch_size * macs)
    return (steps * step + max(epochs * costs.step_seconds, costs.seconds_per_flop * 2 * eval_rows * macs)
            + epochs * bucket.train_rows * costs.row_seconds)


def plan_buckets(config: TrainConfig, shapes: Mapping, work: Mapping, rules: tuple[bool, bool, bool],
                 mode: str = "auto", backend: str | None = None) -> list[tuple[Bucket | None, tuple]]:
    r"""Which datasets of one program config share a padded program.

    Args:
      config: the program config (its model's widths and batch size enter the cost).
      shapes: ``source -> Bucket`` of the dataset's own shapes.
      work: ``source -> (optimizer steps, epochs, evaluated rows)`` summed over its runs
        (:func:`padded_run_seconds`).
      rules: ``(rows, features, classes)`` the config may pad
        (:func:`dreg_jax.engine.buckets.padding_rules`); datasets that differ on an axis that
        may not be padded never share.
      mode: ``"auto"`` (the cost model), ``"none"`` (every dataset at its own shapes),
        ``"all"`` (every dataset that may share, in one bucket).

    Returns:
      ``[(bucket, sources)]``: ``bucket`` the join of the sources' shapes, None for a lone
      dataset at its own shapes (no padding).

    ``"auto"`` merges greedily, the pair with the largest saving first, while a merge saves
    time: the compile time of one program against the compute the padding adds,

    .. math:: t_\text{compile} > \sum_{s \in A \cup B} \big[T_s(A \vee B) - T_s(\text{own group})\big],

    with :math:`T_s(b)` the runs of dataset ``s`` at bucket ``b`` (:func:`padded_run_seconds`).
    """
    if mode not in BUCKET_MODES:
        raise ValueError(f"shape_buckets must be one of {', '.join(BUCKET_MODES)}, got {mode!r}")
    costs = backend_costs(backend)
    rows, features, classes = rules
    sources = list(shapes)

    def fixed(source):  # the axes that may not be padded: only equal ones share
        b = shapes[source]
        return (None if features else b.features, None if classes else b.classes, b.val_rows > 0, b.robust_sets > 0)

    if mode == "none" or not rows:
        return [(None, (s,)) for s in sources]
    families = {}
    for s in sources:
        families.setdefault(fixed(s), []).append(s)
    out = []
    for members in families.values():
        # start from the datasets of equal shapes (the data draws of one set), then merge
        same = {}
        for s in members:
            same.setdefault(shapes[s], []).append(s)
        groups = [[bucket, tuple(group), *(sum(work[s][i] for s in group) for i in range(3))]
                  for bucket, group in same.items()]
        if mode == "all":
            bucket = groups[0][0]
            for g in groups[1:]:
                bucket = bucket.join(g[0])
            groups = [[bucket, tuple(members), 0, 0, 0]]
        else:  # the run time is linear in the steps and epochs: a group's sums stand for its runs
            def seconds(g):
                return padded_run_seconds(config, g[0], g[2], g[3], g[4], costs)

            while len(groups) > 1:
                best, best_gain = None, 0.0
                for a, b in itertools.combinations(range(len(groups)), 2):
                    ga, gb = groups[a], groups[b]
                    merged = [ga[0].join(gb[0]), ga[1] + gb[1], ga[2] + gb[2], ga[3] + gb[3], ga[4] + gb[4]]
                    gain = costs.compile_seconds - (seconds(merged) - seconds(ga) - seconds(gb))
                    if gain > best_gain:
                        best, best_gain = (a, b, merged), gain
                if best is None:
                    break
                a, b, merged = best
                groups = [g for i, g in enumerate(groups) if i not in (a, b)] + [merged]
        for bucket, group, *_ in groups:
            group = tuple(sorted(group, key=sources.index))
            alone = all(shapes[s] == bucket for s in group)  # nothing to pad
            out.append((None if alone else bucket, group))
    return out
