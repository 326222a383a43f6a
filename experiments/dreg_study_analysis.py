r"""The DREG study's statistics, verdicts, tables and figures (``report.md``), from raw results.

**Arms.** Each regularizer kind is an arm; DREG is two, by its reading (``dreg_scope``):
``DREG-act`` penalizes :math:`\sum_l E\|\sigma'(z_l)\|^2` (the activation slopes) and
``DREG-layer`` the full layer maps :math:`\sum_l E\|\operatorname{diag}(\sigma'(z_l))W_l\|_F^2`.

**Protocols** (both reported):

* ``paper``: every arm at its fixed study strength (``meta["paper_strengths"]``; DREG
  :math:`10^{-2.5}`), no tuning;
* ``fair``: every arm with a strength picks it from the study's log grid per (dataset,
  activation, training fraction) by the mean *validation* accuracy over seeds (ties: the
  strength nearest the paper's on a log scale, then the smaller); its test results are
  then those of the picked strength. Test accuracy never enters a choice.

**Regimes** per matched cell (dataset, activation, seed): ``clean`` = test accuracy at 100%
data; ``noise`` = mean accuracy over the robust test sets at 100%; ``scarcity`` = test accuracy
at the smallest fraction; ``overall`` = the mean of the three.

**Datasets reported apart.** A dataset is left out of the verdicts when even the
unregularized network does not learn it: mean validation accuracy of ``none`` (paper protocol,
100% data) below chance (1 / classes) + 10 pp. Its numbers are still in the per-dataset table.

**Tests** (:func:`dreg_jax.analysis.stats.signed_rank_test`; one-sided "DREG arm > X" for the
verdicts, two-sided shown beside), Holm-corrected together over *every* test in the report:

* pooled: (dataset, activation) cells, each the mean over seeds, per regime;
* per dataset (the paper's unit, clean accuracy): seeds, each the mean over activations;
* scarcity interaction: cells, :math:`(A - X)_{10\%} - (A - X)_{100\%}`;
* GELU: (dataset, seed) pairs of GELU networks, all learnable datasets and the messy ones.

``DREG-act`` under ReLU is a forced tie (:math:`\sigma'^2 \in \{0, 1\}` has zero gradient, so
the run is ``none``'s): ReLU cells are left out of every ``DREG-act`` test and rank.

**Verdicts** (:func:`verdict`): SUPPORTED when the direction holds and every test it needs
is significant after Holm; UNDERPOWERED when the direction holds but a needed test could not
reach alpha even with every pair in DREG's favour (:math:`2^{-n} > \alpha / m`); else NOT
SUPPORTED. Rank claims are recomputed without the sixth regularizer (our guess,
Hoffman et al.'s Jacobian penalty), since it alone can decide them.
"""
from __future__ import annotations

import collections
import pathlib
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats as scipy_stats  # noqa: E402

from dreg_jax.analysis.stats import holm, pairs_needed, signed_rank_test  # noqa: E402
from dreg_jax.training.regularizers import REGISTRY  # noqa: E402
from dreg_jax.tuning import choose  # noqa: E402

REGIMES = ("clean", "noise", "scarcity", "overall")
ARMS = ("none", "weight_decay", "spectral_norm", "igpen", "jacobian", "dreg_act", "dreg_layer")
DREG_ARMS = ("dreg_act", "dreg_layer")
LABELS = {**{name: r.label for name, r in REGISTRY.items()}, "dreg_act": "DREG-act", "dreg_layer": "DREG-layer"}
GUESSED = "jacobian"  # the sixth regularizer is our guess (Hoffman et al. 2019)
PROTOCOLS = ("paper", "fair")
ALPHA = 0.05
LEARNABLE_MARGIN = 0.10
SUPPORTED, NOT_SUPPORTED, UNDERPOWERED = "SUPPORTED", "NOT SUPPORTED", "UNDERPOWERED"
README_BEGIN, README_END = "<!-- dreg-study-summary:begin -->", "<!-- dreg-study-summary:end -->"


def arm_of(kind: str, scope: str | None) -> str:
    if kind != "dreg":
        return kind
    return "dreg_layer" if scope == "layer" else "dreg_act"


def _strength(record, reg):
    """The run's resolved strength (None for kinds without one, e.g. none and SN)."""
    kind = REGISTRY.get(reg["kind"])
    if kind is not None and kind.default_strength is None:
        return None
    value = (record.get("hparams") or {}).get("strength", reg.get("strength"))
    return kind.default_strength if value is None and kind is not None else value


def flatten(records) -> list[dict]:
    rows = []
    for r in records:
        s, c, m = r["spec"], r["spec"]["config"], r["metrics"]
        ok = r["status"] == "ok"
        reg = c["regularizer"]
        rows.append({
            "dataset": s["dataset"], "activation": c["model"]["activation"],
            "arm": arm_of(reg["kind"], reg.get("dreg_scope")), "seed": s["seed"], "fraction": s["data_fraction"],
            "strength": _strength(r, reg),
            "ok": ok, "test": m["test_accuracy"] if ok else np.nan,
            "robust": m.get("robust_accuracy", np.nan) if ok else np.nan,
            # a failed run counts as chance-free zero on validation: never picked
            "val": (m.get("validation_accuracy", np.nan) if ok else 0.0),
            "tau": m.get("tau", np.nan), "jac": m.get("jacobian_sq_norms"), "hidden": c["model"]["hidden"],
        })
    for row in rows:
        row["val"] = np.nan if row["val"] is None else row["val"]
        row["strength"] = None if row["strength"] is None else float(row["strength"])
    return rows


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.isclose(a, b, rtol=1e-6))


def select_protocol(rows, protocol: str, paper_strengths: dict):
    """The rows a protocol scores, and its choices ``{(dataset, activation, fraction, arm): strength}``."""
    groups = collections.defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["activation"], row["fraction"], row["arm"])].append(row)
    chosen, choices = [], {}
    for key, group in groups.items():
        paper = paper_strengths.get(key[3])
        strengths = sorted({r["strength"] for r in group}, key=lambda s: -1 if s is None else s)
        if protocol == "paper" or len(strengths) == 1:
            matches = [s for s in strengths if _same(s, paper)] or (
                strengths if len(strengths) == 1 or _forced_tie(key[3], key[1]) else [])  # ties: any strength
            if not matches:
                continue  # the paper strength was not run for this arm
            pick = matches[0]
        else:  # best mean validation accuracy; ties nearest the paper's strength, then smaller
            accuracy = {(s, 0.0): [r["val"] for r in group if _same(r["strength"], s)] for s in strengths}
            pick = choose(accuracy, near=paper)[0]
        choices[key] = pick
        chosen += [r for r in group if _same(r["strength"], pick)]
    return chosen, choices


def scaling_decision(rows, arm, readings: dict, learnable) -> dict:
    """Which reading of DREG's fixed lambda the paper protocol uses, decided on validation data:
    ``readings`` maps a name (raw-sum, width-normalized) to the strength it amounts to; the one
    with the higher mean validation accuracy over every (learnable dataset, activation,
    fraction, seed) run of ``arm`` wins (ties: the first listed). Forced ties are left out."""
    scores = {}
    for name, strength in readings.items():
        vals = [r["val"] for r in rows if r["arm"] == arm and r["dataset"] in learnable
                and not _forced_tie(arm, r["activation"]) and _same(r["strength"], strength)]
        scores[name] = float(np.nanmean(vals)) if vals else np.nan
    finite = {k: v for k, v in scores.items() if np.isfinite(v)}
    chosen = max(finite, key=lambda k: (finite[k], -list(readings).index(k))) if finite else next(iter(readings))
    return {"validation_accuracy": scores, "chosen": chosen}


def is_learned(validation_accuracy: float, chance: float) -> bool:
    """The learnability rule: validation accuracy of the reference model >= chance +
    LEARNABLE_MARGIN (unknown, NaN: kept)."""
    return not np.isfinite(validation_accuracy) or validation_accuracy >= chance + LEARNABLE_MARGIN


def learnable_datasets(rows, num_classes: dict) -> tuple[list, dict]:
    """``(learnable, {dataset: (validation accuracy of none, chance)})`` (module docstring)."""
    info, keep = {}, []
    full = max(r["fraction"] for r in rows)
    for ds in sorted({r["dataset"] for r in rows}):
        vals = [r["val"] for r in rows if r["dataset"] == ds and r["arm"] == "none" and r["fraction"] == full]
        chance = 1.0 / num_classes.get(ds, 2)
        v = float(np.nanmean(vals)) if vals and np.any(np.isfinite(vals)) else np.nan
        info[ds] = (v, chance)
        if is_learned(v, chance):
            keep.append(ds)
    return keep, info


def regime_scores(rows, arms):
    """``(cells, {regime: (n_cells, n_arms)})`` over (dataset, activation, seed), NaN where missing."""
    fractions = sorted({row["fraction"] for row in rows})
    full, scarce = max(fractions), min(fractions)
    cells = sorted({(row["dataset"], row["activation"], row["seed"]) for row in rows})
    index = {c: i for i, c in enumerate(cells)}
    arr = {k: np.full((len(cells), len(arms)), np.nan) for k in ("clean", "noise", "scarcity")}
    for row in rows:
        if row["arm"] not in arms:
            continue
        i, j = index[(row["dataset"], row["activation"], row["seed"])], arms.index(row["arm"])
        if row["fraction"] == full:
            arr["clean"][i, j], arr["noise"][i, j] = row["test"], row["robust"]
        if row["fraction"] == scarce and scarce != full:
            arr["scarcity"][i, j] = row["test"]
    if scarce == full:
        del arr["scarcity"]
    arr["overall"] = np.mean(np.stack(list(arr.values())), axis=0)
    return cells, arr


def _forced_tie(arm, activation) -> bool:
    return arm == "dreg_act" and activation == "relu"


def mean_ranks(values, cells, arms, focus=None):
    """Mean rank (1 = best) of each arm over complete cells; ``DREG-act``'s forced-tie cells
    (ReLU) are left out when ``focus`` is DREG-act."""
    keep = [i for i, c in enumerate(cells) if not (focus == "dreg_act" and c[1] == "relu")]
    v = values[keep]
    v = v[~np.isnan(v).any(axis=1)]
    if not len(v):
        return np.full(len(arms), np.nan)
    return np.apply_along_axis(lambda row: scipy_stats.rankdata(-row), 1, v).mean(axis=0)


def _unit_means(values, cells, key):
    """Mean of ``values`` over cells grouped by ``key(cell)``: ``(keys, (groups, arms))``."""
    groups = collections.defaultdict(list)
    for i, c in enumerate(cells):
        groups[key(c)].append(i)
    keys = sorted(groups)
    return keys, np.array([np.nanmean(values[groups[k]], axis=0) for k in keys]) if keys else np.zeros((0, values.shape[1]))


def _paired(values, j, k):
    ok = ~np.isnan(values[:, j]) & ~np.isnan(values[:, k])
    return values[ok, j], values[ok, k]


def run_tests(protocol_scores, arms, datasets, messy) -> list[dict]:
    """Every test of the report (module docstring), Holm-adjusted together."""
    tests = []
    for protocol, (cells, scores) in protocol_scores.items():
        for arm in (a for a in DREG_ARMS if a in arms):
            j = arms.index(arm)
            usable = [i for i, c in enumerate(cells) if c[0] in datasets and not _forced_tie(arm, c[1])]
            sub_cells = [cells[i] for i in usable]
            for other in (a for a in arms if a not in DREG_ARMS):
                k = arms.index(other)
                base = {"protocol": protocol, "arm": arm, "vs": other}
                for regime, values in scores.items():
                    _, means = _unit_means(values[usable], sub_cells, lambda c: (c[0], c[1]))
                    tests.append({**base, "family": "pooled", "regime": regime, "unit": "(dataset, activation) cells",
                                  **signed_rank_test(*_paired(means, j, k))})
                clean = scores["clean"][usable]
                for ds in datasets:
                    rows = [i for i, c in enumerate(sub_cells) if c[0] == ds]
                    _, means = _unit_means(clean[rows], [sub_cells[i] for i in rows], lambda c: c[2])
                    tests.append({**base, "family": "per_dataset", "regime": "clean", "dataset": ds,
                                  "unit": "seeds", **signed_rank_test(*_paired(means, j, k))})
                if "scarcity" in scores:
                    _, full = _unit_means(scores["clean"][usable], sub_cells, lambda c: (c[0], c[1]))
                    _, scarce = _unit_means(scores["scarcity"][usable], sub_cells, lambda c: (c[0], c[1]))
                    gap_scarce, gap_full = scarce[:, j] - scarce[:, k], full[:, j] - full[:, k]
                    ok = ~np.isnan(gap_scarce) & ~np.isnan(gap_full)
                    tests.append({**base, "family": "scarcity_interaction", "regime": "scarcity - clean",
                                  "unit": "(dataset, activation) cells",
                                  **signed_rank_test(gap_scarce[ok], gap_full[ok])})
                for subset, names in (("all", datasets), ("messy", [d for d in datasets if d in messy])):
                    rows = [i for i, c in enumerate(cells) if c[1] == "gelu" and c[0] in names]
                    if not rows:
                        continue
                    tests.append({**base, "family": "gelu", "regime": "clean", "subset": subset,
                                  "unit": "(dataset, seed) pairs",
                                  **signed_rank_test(*_paired(scores["clean"][rows], j, k))})
    adjusted = holm([t["p_greater"] for t in tests])
    for t, p in zip(tests, adjusted):
        t["p_holm"] = float(p)
        t["underpowered"] = t["min_p_greater"] > ALPHA / len(tests)
    return tests


def verdict(direction_ok: bool, needed_tests) -> str:
    """SUPPORTED / NOT SUPPORTED / UNDERPOWERED from the claim's direction and the tests it
    needs (each with ``p_holm``, ``mean_diff`` and ``underpowered``); see the module docstring."""
    if not direction_ok:
        return NOT_SUPPORTED
    needed_tests = list(needed_tests)
    if any(t["mean_diff"] <= 0 for t in needed_tests):
        return NOT_SUPPORTED
    if all(t["p_holm"] <= ALPHA for t in needed_tests):
        return SUPPORTED
    if any(t["underpowered"] and t["p_holm"] > ALPHA for t in needed_tests):
        return UNDERPOWERED
    return NOT_SUPPORTED


def explain(direction_ok: bool, needed_tests, failed: str = "The direction does not hold") -> str:
    """Why :func:`verdict` says what it says, in a few words."""
    needed_tests = list(needed_tests)
    if not direction_ok:
        return failed
    against = [LABELS[t["vs"]] for t in needed_tests if t["mean_diff"] <= 0]
    if against:
        return "Not above " + ", ".join(against)
    weak = [LABELS[t["vs"]] for t in needed_tests if t["p_holm"] > ALPHA]
    if not weak:
        return "Direction holds and every needed test is significant after Holm"
    return "Direction holds, not significant after Holm vs " + ", ".join(weak)


def _find(tests, **where):
    return [t for t in tests if all(t.get(k) == v for k, v in where.items())]


def claims(a, protocol, arm, without_guessed=False) -> list[tuple[str, str, str]]:
    """``[(claim, verdict, detail)]`` for one protocol and DREG arm."""
    cells, scores = a["scores"][protocol]
    arms = a["arms"]
    others = [x for x in arms if x not in DREG_ARMS and not (without_guessed and x == GUESSED)]
    field = others + [arm]
    idx = [arms.index(x) for x in field]
    keep = [i for i, c in enumerate(cells) if c[0] in a["learnable"]]
    tests = [t for t in a["tests"] if t["protocol"] == protocol and t["arm"] == arm and t["vs"] in others]
    out = []

    def judged(direction_ok, needed, failed="Another arm has the best mean rank"):
        needed = list(needed)
        return verdict(direction_ok, needed), explain(direction_ok, needed, failed)

    def ranks(regime, rows=None):
        rows = keep if rows is None else rows
        return dict(zip(field, mean_ranks(scores[regime][rows][:, idx], [cells[i] for i in rows], field, focus=arm)))

    def best(r):
        finite = {k: v for k, v in r.items() if np.isfinite(v)}
        return bool(finite) and min(finite, key=finite.get) == arm and \
            sum(np.isclose(v, finite[arm]) for v in finite.values()) == 1

    def fmt(ts):
        return "; ".join(f"vs {LABELS[t['vs']]} {100 * t['mean_diff']:+.2f} pp, p = {t['p_greater']:.2g}, "
                         f"Holm {t['p_holm']:.2g}" for t in ts)

    r = ranks("clean")
    ts = [t for t in _find(tests, family="pooled", regime="clean") if t["vs"] in ("none", "weight_decay", "igpen")]
    per_ds = [t for t in _find(tests, family="per_dataset") if t["vs"] in ("none", "weight_decay", "igpen")]
    reach = sum(t["p_greater"] <= 1 / 32 + 1e-12 for t in per_ds)
    reach_holm = sum(t["p_holm"] <= ALPHA for t in per_ds)
    power = (f"; with {per_ds[0]['n']} seeds no per-dataset test can (>= {pairs_needed(a['num_tests'])} needed)"
             if per_ds and all(t["underpowered"] for t in per_ds) else "")
    v, why = judged(best(r), ts)
    out.append(("best on clean accuracy, Wilcoxon p <= 0.031 vs none, WD, IGPen", v,
                f"{why}. Mean clean rank {r[arm]:.2f} (best: {LABELS[min(r, key=r.get)]} {min(r.values()):.2f}); pooled "
                f"{fmt(ts)}. Per dataset over seeds (the paper's unit): {reach} of {len(per_ds)} tests reach the "
                f"paper's uncorrected one-sided p <= 0.031, {reach_holm} after Holm over {a['num_tests']} tests{power}"))
    r = ranks("overall")
    ts = _find(tests, family="pooled", regime="overall")
    v, why = judged(best(r), ts)
    out.append(("best overall", v,
                f"{why}. Mean overall rank {r[arm]:.2f} (best: {LABELS[min(r, key=r.get)]} {min(r.values()):.2f}); {fmt(ts)}"))
    r = ranks("noise")
    order = sorted(r, key=r.get)
    second = order[:2] == ["spectral_norm", arm]
    out.append(("second to SN on noise robustness (ranks)", SUPPORTED if second else NOT_SUPPORTED,
                "noise rank order: " + ", ".join(f"{LABELS[x]} {r[x]:.2f}" for x in order)))
    for subset, names in (("all", a["learnable"]), ("messy", [d for d in a["learnable"] if d in a["messy"]])):
        rows = [i for i, c in enumerate(cells) if c[1] == "gelu" and c[0] in names]
        if not rows:
            continue
        r = ranks("clean", rows)
        ts = _find(tests, family="gelu", subset=subset)
        v, why = judged(best(r), ts)
        out.append((f"best regularizer under GELU ({'all learnable datasets' if subset == 'all' else 'messy sets: ' + ', '.join(names)})",
                    v, f"{why}. GELU clean rank {r[arm]:.2f} (best: {LABELS[min(r, key=r.get)]} "
                                          f"{min(r.values()):.2f}); {fmt(ts)}"))
    ts = _find(tests, family="scarcity_interaction")
    if ts:
        v, why = judged(all(t["mean_diff"] > 0 for t in ts), ts, "The gap does not grow at 10% against every arm")
        out.append(("gains largest under data scarcity (interaction vs each regularizer)", v,
                    why + ". " + "; ".join(f"vs {LABELS[t['vs']]}: gap {100 * t['mean_diff']:+.2f} pp larger at 10%, p = "
                              f"{t['p_greater']:.2g}, Holm {t['p_holm']:.2g}" for t in ts)))
    return out


def analyse(records, meta: dict | None = None) -> dict:
    """Everything the report shows, from the raw records and the study's ``meta``."""
    from dreg_jax.data.registry import REGISTRY as DATASETS

    meta = meta or {}
    rows = flatten(records)
    present = {r["arm"] for r in rows}
    arms = [x for x in ARMS if x in present] + sorted(present - set(ARMS))
    paper = {x: None for x in arms}
    paper.update({k: (None if v is None else float(v)) for k, v in meta.get("paper_strengths", {}).items()})
    for x in arms:  # arms without a stated paper strength: the registry default
        if x not in meta.get("paper_strengths", {}):
            kind = "dreg" if x in DREG_ARMS else x
            paper[x] = REGISTRY[kind].default_strength if kind in REGISTRY else None
    has_val = any(np.isfinite(r["val"]) for r in rows)
    protocols = PROTOCOLS if has_val else ("paper",)
    num_classes = {name: info.num_classes for name, info in DATASETS.items()}
    learnable, learnability = learnable_datasets([r for r in rows if r["arm"] == "none"], num_classes)
    decisions = {}
    if has_val and meta.get("dreg_scalings"):
        for arm in (x for x in DREG_ARMS if x in arms):
            decisions[arm] = scaling_decision(rows, arm, meta["dreg_scalings"], learnable)
            paper[arm] = meta["dreg_scalings"][decisions[arm]["chosen"]]
    out = {"rows": rows, "arms": arms, "paper_strengths": paper, "protocols": protocols,
           "failed": sum(not r["ok"] for r in rows), "scores": {}, "choices": {},
           "learnable": learnable, "learnability": learnability, "scaling_decisions": decisions}
    selected = {}
    for p in protocols:
        selected[p], out["choices"][p] = select_protocol(rows, p, paper)
        out["scores"][p] = regime_scores(selected[p], arms)
    out["messy"] = [d for d, info in DATASETS.items() if info.messy]
    out["activations"] = sorted({r["activation"] for r in rows})
    out["datasets"] = sorted({r["dataset"] for r in rows})
    out["tests"] = run_tests(out["scores"], arms, out["learnable"], out["messy"])
    out["num_tests"] = len(out["tests"])
    out["claims"] = {(p, arm, without): claims(out, p, arm, without)
                     for p in protocols for arm in DREG_ARMS if arm in arms for without in (False, True)
                     if not without or GUESSED in arms}
    return out


def _pct(x):
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.2f}"


def _means(a, protocol, rows_filter=None):
    cells, scores = a["scores"][protocol]
    keep = [i for i, c in enumerate(cells) if c[0] in a["learnable"] and (rows_filter is None or rows_filter(c))]
    return {k: np.nanmean(v[keep], axis=0) if keep else np.full(len(a["arms"]), np.nan) for k, v in scores.items()}


def summary_lines(a) -> list[str]:
    """The README block: the headline table per protocol and every verdict line."""
    md = []
    for p in a["protocols"]:
        means = _means(a, p)
        md += [f"**{p} protocol** (mean accuracy %, learnable datasets; DREG-act without ReLU cells in its ranks)", "",
               "| regularizer | " + " | ".join(means) + " |", "|---|" + "---|" * len(means)]
        for j, arm in enumerate(a["arms"]):
            md.append(f"| {LABELS[arm]} | " + " | ".join(_pct(means[k][j]) for k in means) + " |")
        md.append("")
    for (p, arm, without), lines in a["claims"].items():
        if without:
            continue
        md.append(f"- **{LABELS[arm]}, {p} protocol**: " + "; ".join(
            f"{claim}: **{v}**" + (f" (without JacReg: {w})" if (w := _without(a, p, arm, claim)) not in (v, None) else "")
            for claim, v, _ in lines))
    return md


def _without(a, protocol, arm, claim):
    for c, v, _ in a["claims"].get((protocol, arm, True), []):
        if c == claim:
            return v
    return None


def v1_verdicts(path) -> list[tuple[str, str]]:
    """``[(claim, verdict)]`` parsed from a v1 report's claim lines (``- **claim**: VERDICT.``)."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return re.findall(r"^- \*\*(.+?)\*\*: (SUPPORTED|NOT SUPPORTED)", path.read_text(), flags=re.M)


def _figures(a, out: pathlib.Path):
    arms, files = a["arms"], []
    fig, axes = plt.subplots(1, len(a["protocols"]), figsize=(9 * len(a["protocols"]), 4), squeeze=False)
    width = 0.8 / len(arms)
    for ax, p in zip(axes[0], a["protocols"]):
        means = _means(a, p)
        for j, arm in enumerate(arms):
            ax.bar(np.arange(len(means)) + j * width, [100 * means[k][j] for k in means], width, label=LABELS[arm])
        ax.set_xticks(np.arange(len(means)) + 0.4 - width / 2, list(means))
        lo = 100 * np.nanmin([np.nanmin(v) for v in means.values()])
        ax.set_ylim(max(0, lo - 5), 100)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{p} protocol")
    axes[0, -1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    files.append(_save(fig, out / "accuracy_by_regime.png"))
    # tuning picks: which grid strength the fair protocol chose, per arm
    if "fair" in a["choices"]:
        picks = collections.defaultdict(collections.Counter)
        for (ds, act, frac, arm), s in a["choices"]["fair"].items():
            if s is not None and not _forced_tie(arm, act):
                picks[arm][s / a["paper_strengths"][arm] if a["paper_strengths"].get(arm) else s] += 1
        if picks:
            fig, ax = plt.subplots(figsize=(7, 3.5))
            ratios = sorted({r for c in picks.values() for r in c})
            w = 0.8 / len(picks)
            for j, (arm, c) in enumerate(sorted(picks.items())):
                ax.bar(np.arange(len(ratios)) + j * w, [c[r] for r in ratios], w, label=LABELS[arm])
            ax.set_xticks(np.arange(len(ratios)) + 0.4 - w / 2, [f"x{r:g}" for r in ratios])
            ax.set_xlabel("picked strength / paper strength")
            ax.set_ylabel("(dataset, activation, fraction) picks")
            ax.legend(fontsize=8)
            ax.set_title("Fair protocol: strengths picked on validation accuracy")
            files.append(_save(fig, out / "tuning_picks.png"))
    # per-layer activation Jacobian terms (paper protocol, 100% data)
    rows = a["rows"]
    full = max(r["fraction"] for r in rows)
    per_arm = collections.defaultdict(list)
    for x in rows:
        if x["ok"] and x["jac"] and x["fraction"] == full and _same(x["strength"], a["paper_strengths"].get(x["arm"])):
            per_arm[x["arm"]].append(np.asarray(x["jac"]) / np.asarray(x["hidden"]))
    if per_arm:
        layers = max(len(v[0]) for v in per_arm.values())
        fig, ax = plt.subplots(figsize=(7, 4))
        for j, arm in enumerate(arms):
            if per_arm.get(arm):
                ax.bar(np.arange(layers) + j * width, np.mean(per_arm[arm], axis=0), width, label=LABELS[arm])
        ax.set_xticks(np.arange(layers) + 0.4 - width / 2, [f"layer {i + 1}" for i in range(layers)])
        ax.set_ylabel("mean squared activation slope  s_l / d_l")
        ax.legend(fontsize=8)
        ax.set_title("Per-layer activation terms (test set, end of training, paper protocol)")
        files.append(_save(fig, out / "jacobian_norms.png"))
    fig, ax = plt.subplots(figsize=(8, 4))
    data = [[x["tau"] for x in rows if x["arm"] == arm and x["ok"] and x["tau"] is not None and np.isfinite(x["tau"])]
            for arm in arms]
    ax.boxplot([d if d else [np.nan] for d in data], tick_labels=[LABELS[x] for x in arms], showfliers=False)
    ax.set_ylabel("tau = p99 / mean per-example grad norm")
    ax.set_title("Gradient tail ratio (label-free, end of training, every run)")
    files.append(_save(fig, out / "tau_distributions.png"))
    return files


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _test_table(tests, family, columns):
    rows = [t for t in tests if t["family"] == family]
    if not rows:
        return []
    md = ["| protocol | arm | vs | " + " | ".join(c for c, _ in columns) + " | n | W/T/L | mean diff (pp) | "
          "p one-sided | p two-sided | p Holm | reachable |",
          "|---|---|---|" + "---|" * len(columns) + "---|---|---|---|---|---|---|"]
    for t in rows:
        md.append(f"| {t['protocol']} | {LABELS[t['arm']]} | {LABELS[t['vs']]} | "
                  + " | ".join(str(t.get(k, "")) for _, k in columns)
                  + f" | {t['n']} | {t['wins']}/{t['ties']}/{t['losses']} | {100 * t['mean_diff']:+.2f} | "
                  f"{t['p_greater']:.3g} | {t['p_two_sided']:.3g} | {t['p_holm']:.3g} | "
                  f"{'no' if t['underpowered'] else 'yes'} |")
    return md + [""]


def write_report(records, out, meta: dict) -> str:
    """Writes ``report.md`` and the PNG figures into ``out``; returns the summary block (copied into docs/history/dreg_v2.md)."""
    out = pathlib.Path(out)
    a = analyse(records, meta)
    arms = a["arms"]
    figures = _figures(a, out)
    md = [f"# DREG study v2 - profile `{meta.get('profile')}`", ""]
    run_seconds = sum(r.get("seconds", 0.0) for r in records)
    md.append(f"{len(records)} runs, {a['failed']} failed (non-finite loss). "
              + (f"Wall time of the invocation that wrote these results: {meta['wall_seconds_this_invocation']:.1f} s"
                 + (f" (tuning grid runs: {meta['grid_share']:.0%} of the runs, {meta['grid_seconds_share']:.0%} of the "
                    "run seconds)" if "grid_share" in meta else "") + ". "
                 if "wall_seconds_this_invocation" in meta else "")
              + f"Run seconds recorded with the runs: {run_seconds:.1f} s.")
    sw = meta.get("sweep", {})
    if sw:
        md.append(f"\nGrid: datasets {sw['datasets']}; activations {sw['activations']}; regularizers "
                  f"{sw['regularizers']} with DREG scopes {sw['dreg_scope']}; seeds {sw['seeds']}; fractions "
                  f"{sw['fractions']}; hidden {sw['hidden']}; epochs {sw['epochs']}; batch {sw['batch_size']}; "
                  f"Adam lr {sw['learning_rates']}; validation fraction {sw.get('validation_fraction', 0)}; "
                  f"regularizer options {sw.get('regularizer_options', {})}; strength grid {sw['strengths']}.")
    paper = a["paper_strengths"]
    md.append("\nPaper-protocol strengths: " + ", ".join(
        f"{LABELS[x]} " + ("-" if paper[x] is None else f"{paper[x]:g}") for x in arms) + ".")
    if meta.get("settings"):
        md += ["", "## Settings and their sources", ""] + [f"- {line}" for line in meta["settings"]]
    if a["scaling_decisions"]:
        md += ["", "## DREG's scaling, decided on validation data", "",
               "The fixed lambda = 10^-2.5 is read as a raw sum over layers or divided by each layer's width "
               "(64 here, so width-normalized = lambda / 64). The paper protocol uses the reading with the higher "
               "mean validation accuracy over all of the arm's runs on learnable datasets (never test data):", ""]
        for arm, d in a["scaling_decisions"].items():
            md.append(f"- {LABELS[arm]}: " + ", ".join(f"{k} {_pct(v)}%" for k, v in d["validation_accuracy"].items())
                      + f" -> **{d['chosen']}**")
    md += ["", "## Summary (copied into docs/history/dreg_v2.md)", "", README_BEGIN, ""] + summary_lines(a) + ["", README_END, ""]
    md += ["## Verdicts in full", "",
           f"alpha = {ALPHA}, Holm over all {a['num_tests']} tests of this report (one-sided p, H1: the DREG arm "
           f"is better). UNDERPOWERED: the direction holds, but a needed test cannot reach alpha even if every "
           f"pair favoured DREG (one-sided exact p >= 2^-n > alpha / {a['num_tests']}; n >= "
           f"{pairs_needed(a['num_tests'])} pairs needed).", ""]
    for (p, arm, without), lines in a["claims"].items():
        md.append(f"### {LABELS[arm]}, {p} protocol{', without the guessed JacReg' if without else ''}")
        md.append("")
        md += [f"- **{claim}**: {v}. {detail}." for claim, v, detail in lines]
        md.append("")
    apart = [d for d in a["datasets"] if d not in a["learnable"]]
    md += ["## Datasets reported apart", ""]
    md.append(("Left out of every verdict and table mean (mean validation accuracy of `none` below chance + "
               f"{100 * LEARNABLE_MARGIN:.0f} pp): " + ", ".join(
                   f"{d} (validation {_pct(a['learnability'][d][0])}%, chance {_pct(a['learnability'][d][1])}%)"
                   for d in apart) + ". Their numbers are in the per-dataset table.") if apart else
              "None: every dataset is learned above chance + 10 pp on validation data.")
    md.append("")
    for p in a["protocols"]:
        means = _means(a, p)
        cells, scores = a["scores"][p]
        md += [f"## Accuracy (%) and mean rank, {p} protocol", "",
               "| regularizer | " + " | ".join(f"{k} acc" for k in means) + " | "
               + " | ".join(f"{k} rank" for k in means) + " |", "|---|" + "---|" * (2 * len(means))]
        keep = [i for i, c in enumerate(cells) if c[0] in a["learnable"]]
        rk = {k: mean_ranks(v[keep], [cells[i] for i in keep], arms) for k, v in scores.items()}
        for j, arm in enumerate(arms):
            md.append(f"| {LABELS[arm]} | " + " | ".join(_pct(means[k][j]) for k in means) + " | "
                      + " | ".join(f"{rk[k][j]:.2f}" for k in means) + " |")
        md += ["", "Ranks over complete (dataset, activation, seed) cells of learnable datasets, all arms together "
               "(DREG-act's ReLU cells are `none`'s runs).", ""]
    if "fair" in a["choices"]:
        md += ["## Fair protocol: strengths picked on validation accuracy", "",
               "| arm | " + " | ".join(f"x{r:g}" for r in (0.1, 1, 10)) + " | other (DREG: lambda / 64, the width-normalized reading) |", "|---|---|---|---|---|"]
        for arm in arms:
            ps = a["paper_strengths"].get(arm)
            if not ps:
                continue
            c = collections.Counter(round(s / ps, 6) for (ds, act, f, x), s in a["choices"]["fair"].items()
                                    if x == arm and s is not None and not _forced_tie(arm, act))
            md.append(f"| {LABELS[arm]} | " + " | ".join(str(c.pop(r, 0)) for r in (0.1, 1.0, 10.0))
                      + f" | {sum(c.values())} |")
        md.append("")
    md += ["## Tests", "", "### Pooled over (dataset, activation) cells (means over seeds)", ""]
    md += _test_table(a["tests"], "pooled", [("regime", "regime")])
    md += ["### Scarcity interaction: (DREG - X) at 10% minus at 100%", ""]
    md += _test_table(a["tests"], "scarcity_interaction", [])
    md += ["### Under GELU: (dataset, seed) pairs, clean accuracy", ""]
    md += _test_table(a["tests"], "gelu", [("subset", "subset")])
    md += ["### Per dataset over seeds (the paper's unit), clean accuracy", ""]
    md += _test_table(a["tests"], "per_dataset", [("dataset", "dataset")])
    md += ["## Per activation: mean clean accuracy (%), paper protocol", "",
           "| activation | " + " | ".join(LABELS[x] for x in arms) + " |", "|---|" + "---|" * len(arms)]
    for act in a["activations"]:
        m = _means(a, "paper", lambda c, act=act: c[1] == act)["clean"]
        md.append(f"| {act} | " + " | ".join(_pct(x) for x in m) + " |")
    md += ["", "## Per dataset: mean clean / noise accuracy (%), paper protocol", "",
           "| dataset | " + " | ".join(LABELS[x] for x in arms) + " |", "|---|" + "---|" * len(arms)]
    cells, scores = a["scores"]["paper"]
    for ds in a["datasets"]:
        keep = [i for i, c in enumerate(cells) if c[0] == ds]
        c_, n_ = np.nanmean(scores["clean"][keep], axis=0), np.nanmean(scores["noise"][keep], axis=0)
        md.append(f"| {ds}{' (apart)' if ds not in a['learnable'] else ''} | "
                  + " | ".join(f"{_pct(x)} / {_pct(y)}" for x, y in zip(c_, n_)) + " |")
    md += ["", "## The published claims", "",
           "From the DREG study (arXiv:2606.23942; numbers in [docs/papers.md](../../papers.md)). Every verdict above "
           "is computed from the runs in `results.jsonl.gz` beside this report; `python experiments/rebuild_report.py "
           "<this folder>` rebuilds this report from them.", ""]
    v1 = v1_verdicts(out.parent / meta["v1_report"]) if meta.get("v1_report") else []
    changes = out / "changes_since_v1.md"
    if v1 or changes.exists():
        md += ["## What changed since v1", ""]
        if v1:
            md += [f"v1 ([report](../{meta['v1_report']})): one DREG reading (activation scope), WD multiplied by the "
                   "learning rate, SN on every layer including the head, no validation split, pooled seed-level "
                   "tests with Bonferroni per regime.", "", "| claim | v1 | v2 (DREG-act, paper) | v2 (DREG-layer, paper) "
                   "| v2 (DREG-act, fair) | v2 (DREG-layer, fair) |", "|---|---|---|---|---|---|"]
            for claim, old in v1:
                cols = []
                for p in ("paper", "fair"):
                    for arm in DREG_ARMS:
                        cols.append(_match_claim(a["claims"].get((p, arm, False), []), claim))
                md.append(f"| {claim} | {old} | " + " | ".join(cols[i] for i in (0, 1, 2, 3)) + " |")
            md.append("")
        if changes.exists():
            md += [changes.read_text().strip(), ""]
    md += ["## Figures", ""] + [f"![{f}]({f})" for f in figures]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return "\n".join(summary_lines(a))


def _match_claim(lines, v1_claim: str) -> str:
    key = {"clean": "clean", "overall": "overall", "noise": "noise", "GELU": "GELU", "scarcity": "scarcity"}
    for word, needle in key.items():
        if word.lower() in v1_claim.lower():
            for claim, v, _ in lines:
                if needle.lower() in claim.lower():
                    return v
    return "-"
