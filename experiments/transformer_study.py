"""Transformer study: DREG on GELU transformers from scratch, and MiniLM fine-tuned with DREG.

Regimes (``--regime``):

* ``scratch``: a pre-LN transformer classifier on review token ids (``word_ids``: a hashed
  word vocabulary) and a small ViT on 8x8 digits (2x2 patches), both
  ``dreg_jax.models`` modules trained by the engine as user models. Arms: none, weight decay
  (1e-4), spectral norm (every block Dense), DREG-act (activation scope: the FFN GELUs) and
  DREG-ffn (layer scope: each block's whole FFN map, probe estimator), plus IGPen and the
  Jacobian penalty on the ViT (input-gradient penalties are zero on token ids: the ids are cast
  to integers, so they are left out for text). Fractions 10% and 100%; seeds vmapped.
* ``finetune``: all-MiniLM-L6-v2 (``dreg_jax.models.load_minilm``, pretrained) fine-tuned end to
  end with a linear or a ChainzRule head, with and without DREG on its six FFN GELUs
  (activation scope, ``jacobian_terms``), on reviews / reviews_noisy subsets at several
  fractions; beside them the frozen-encoder linear head (the text study's reading: embeddings
  fixed, head trained) on the same subsets. Encoder lr 5e-5, head lr 1e-3 (Adam).

DREG strength: the study's lambda = 10^-2.5 per token. The paper's MLPs sum the terms over one
example's hidden units; a transformer's FFN acts on every token, so the raw sum grows with the
sequence length (64 tokens: a penalty 64x the MLP's). We divide lambda by the number of tokens
(64 for text, 16 patches for the ViT), which makes each token count as one MLP example.

Writes ``report.md`` and PNGs in ``--out``: accuracy tables, paired Wilcoxon tests over matched
(dataset, fraction, seed) cells with Holm correction, the per-layer DREG terms over training,
and a verdict beside each paper claim. Ends with ``compiled programs: N, ...``.

Usage: python experiments/transformer_study.py --regime scratch|finetune --profile quick|full [--out DIR]
"""
from __future__ import annotations

from _common import (compile_summary, cut_tokens, experiment_args, fast_compile_flags, load_raw_results,
                     wall_time_text, write_meta)

fast_compile_flags()

import collections  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dreg_jax  # noqa: E402
from dreg_jax.data.text import TOKEN_LENGTH, WORD_VOCAB, split_tokens  # noqa: E402

LAMBDA = 10 ** -2.5
PATCHES = 16  # 8x8 digits in 2x2 patches

PROFILES = {
    "quick": {"scratch": dict(text=("reviews_noisy",), vision=("digits_corrupted",), fractions=(0.1, 1.0), seeds=2,
                              epochs=2, width=32, depth=2, heads=4, ffn=64, batch=64),
              "finetune": dict(datasets=("reviews_noisy",), fractions=(0.25, 1.0), train_size=96, test_size=128,
                               seeds=2, epochs=1, length=32, batch=16)},
    "full": {"scratch": dict(text=("reviews", "reviews_noisy"), vision=("digits", "digits_corrupted"),
                             fractions=(0.1, 1.0), seeds=3, epochs=3, width=64, depth=2, heads=4, ffn=128, batch=64),
             "finetune": dict(datasets=("reviews", "reviews_noisy"), fractions=(0.05, 0.25, 1.0), train_size=384,
                              test_size=512, seeds=3, epochs=2, length=48, batch=16)},
}
REGIMES = ("scratch", "finetune")


# ---------------------------------------------------------------- scratch (the engine)

def scratch_arms(modality: str, p: dict, num_classes: int):
    """``arm -> (module, RegularizerConfig, jacobian_layers)`` of one modality."""
    from dreg_jax.models import TextTransformer, VisionTransformer

    def module(spectral_norm=False):
        common = dict(num_classes=num_classes, width=p["width"], depth=p["depth"], num_heads=p["heads"],
                      ffn_hidden=p["ffn"], spectral_norm=spectral_norm)
        if modality == "text":
            return TextTransformer(vocab_size=WORD_VOCAB + 2, **common)
        return VisionTransformer(**common)

    tokens = TOKEN_LENGTH if modality == "text" else PATCHES
    ffn = tuple(f"encoder/block_{i}/ffn" for i in range(p["depth"]))
    R = dreg_jax.RegularizerConfig
    # weight decay as in the DREG study v2: normalized decoupled decay, 0.05 / sqrt(total steps)
    # per step (optax's 1e-4 x lr never acted: WD equalled none bit for bit)
    wd = R("weight_decay", strength=0.05, weight_decay_reading="normalized")
    arms = {"none": (module(), R("none"), ()), "WD": (module(), wd, ()),
            "SN": (module(True), R("none"), ()),
            "DREG-act": (module(), R("dreg", strength=LAMBDA / tokens), ()),
            "DREG-ffn": (module(), R("dreg", strength=LAMBDA / tokens, dreg_scope="layer"), ffn)}
    if modality == "vision":
        arms["IGPen"] = (module(), R("igpen"), ())
        arms["JacReg"] = (module(), R("jacobian"), ())
    return arms


VALIDATION_FRACTION = 0.2  # both regimes: a stratified 20% of each training split held out


def scratch_specs(p):
    """The scratch regime's runs and ``{run_id: arm}``."""
    from dreg_jax.data import load_dataset
    from dreg_jax.engine import RunSpec

    specs, arm_of = [], {}
    for modality, datasets in (("text", p["text"]), ("vision", p["vision"])):
        featurizer = "word_ids" if modality == "text" else "hashed"
        for ds in datasets:
            classes = load_dataset(ds, featurizer=featurizer).num_classes
            for arm, (module, reg, layers) in scratch_arms(modality, p, classes).items():
                config = dreg_jax.TrainConfig(
                    model=dreg_jax.ModelConfig(module=module, activation="custom", jacobian_layers=layers),
                    regularizer=reg, epochs=p["epochs"], batch_size=p["batch"])
                for seed in range(p["seeds"]):
                    for frac in p["fractions"]:
                        spec = RunSpec(ds, config, seed=seed, data_fraction=frac, featurizer=featurizer,
                                       validation_fraction=VALIDATION_FRACTION)
                        specs.append(spec)
                        arm_of[arm_key(spec.to_dict())] = arm
                        arm_of[arm_key(spec.to_dict(), module=repr(module))] = arm  # rows before v3 ids
    return specs, arm_of


def arm_key(spec: dict, module: str | None = None) -> str:
    """A run's spec as JSON, canonical as its run id hashes it (fields added since the committed
    rows were written compare at their defaults). ``module`` replaces the recorded module: the
    committed rows were written when run ids recorded the module's repr, newer rows record its
    code fingerprint."""
    from dreg_jax.engine.specs import canonical_spec

    if module is not None:
        spec = {**spec, "config": {**spec["config"], "model": {**spec["config"]["model"], "module": module}}}
    return json.dumps(canonical_spec(spec), sort_keys=True)


def scratch_rows(records, arm_of):
    """The report's rows of the scratch regime's records."""
    rows = []
    for r in records:
        c = r["curves"]
        rows.append({"dataset": r["spec"]["dataset"], "fraction": r["spec"]["data_fraction"], "seed": r["spec"]["seed"],
                     "arm": arm_of[arm_key(r["spec"])], "ok": r["status"] == "ok", "test": r["metrics"]["test_accuracy"],
                     "robust": r["metrics"].get("robust_accuracy"), "terms": c.get("jacobian_sq_norms"),
                     "seconds": r["seconds"]})
    return rows


def run_scratch(p, out, progress):
    from dreg_jax.engine import EngineOptions, run_sweep

    specs, arm_of = scratch_specs(p)
    # transformers vmap poorly on a CPU (batched attention einsums): one run per call there; on
    # a GPU the engine's default of 256 runs per call ran out of memory (19 GiB per buffer while
    # autotuning the text program on an H200), so 32
    width = 1 if jax.default_backend() == "cpu" else 32
    records = run_sweep(specs, out / "results.jsonl", progress=progress, report=False,
                        options=EngineOptions(per_epoch_diagnostics=True, diag_size=32, vmap_width=width))
    return scratch_rows(records, arm_of)


# ---------------------------------------------------------------- finetune (a custom loop)

def _subset(x, y, size, seed):
    """A class-stratified subset of ``size`` rows (the same for every arm and seed)."""
    order = np.random.default_rng(seed).permutation(len(y))
    per_class = {c: [i for i in order if y[i] == c] for c in np.unique(y)}
    take = []
    for c, idx in per_class.items():
        take += idx[: max(1, round(size * len(idx) / len(y)))]
    take = np.sort(np.asarray(take[:size]))
    return x[take], y[take]


def finetune_runs(p, out, progress):
    from tqdm.auto import tqdm

    from dreg_jax.data import load_dataset
    from dreg_jax.engine.scarcity import stratified_fraction_mask
    from dreg_jax.models import load_minilm, mean_pool
    from dreg_jax.engine.grid import PROCESS_STATS
    from dreg_jax.models.bert import BertEncoder

    encoder, encoder_vars, _ = load_minilm()
    L = p["length"]
    rows, timings = [], []
    arms = [(head, dreg) for head in ("linear", "chainzrule") for dreg in (False, True)]
    total = len(p["datasets"]) * len(p["fractions"]) * (len(arms) + 1)
    bar = tqdm(total=total, desc="finetune configs", disable=not progress)
    for ds_name in p["datasets"]:
        ds = load_dataset(ds_name, featurizer="minilm_tokens", validation_fraction=VALIDATION_FRACTION)
        x_tr, y_tr = _subset(cut_tokens(ds.x_train, L), ds.y_train, p["train_size"], 0)
        x_te, y_te = _subset(cut_tokens(ds.x_test, L), ds.y_test, p["test_size"], 1)
        x_va, y_va = _subset(cut_tokens(ds.x_val, L), ds.y_val, p["test_size"], 2)
        C = ds.num_classes
        # frozen encoder: mean-pooled embeddings once, then a linear head (the text study's reading)
        embed = jax.jit(lambda x: mean_pool(BertEncoder(encoder.config).apply(encoder_vars, *split_tokens(x)), split_tokens(x)[1],
                                            normalize=False))
        e_tr = np.concatenate([np.asarray(embed(x_tr[i:i + 64])) for i in range(0, len(x_tr), 64)])
        e_te = np.concatenate([np.asarray(embed(x_te[i:i + 64])) for i in range(0, len(x_te), 64)])
        e_va = np.concatenate([np.asarray(embed(x_va[i:i + 64])) for i in range(0, len(x_va), 64)])
        print(f"{ds_name}: DREG penalty at the pretrained start {_start_penalty(encoder, encoder_vars, x_tr, y_tr, L):.3g}"
              " (lambda per token x the six GELU terms, one batch)", flush=True)
        for frac in p["fractions"]:
            for seed in range(p["seeds"]):
                mask = np.asarray(stratified_fraction_mask(jax.random.key(seed), jnp.asarray(y_tr), frac, C))
                acc = _frozen_head(e_tr[mask], y_tr[mask], e_te, y_te, C, seed)
                val = _frozen_head(e_tr[mask], y_tr[mask], e_va, y_va, C, seed)  # the same head (same seed)
                rows.append({"dataset": ds_name, "fraction": frac, "seed": seed, "arm": "frozen+linear", "ok": True,
                             "test": acc, "val": val, "terms": None})
            bar.update(1)
            for head, dreg in arms:
                built = _finetune_fns.cache_info().misses
                model, init, step, evaluate = _finetune_fns(C, head, dreg, L, encoder.config)
                new_program = _finetune_fns.cache_info().misses > built
                seeds = list(range(p["seeds"]))
                states = jax.vmap(lambda seed: init(seed, encoder_vars))(jnp.arange(len(seeds)))
                masks = [np.flatnonzero(np.asarray(stratified_fraction_mask(jax.random.key(s), jnp.asarray(y_tr), frac, C)))
                         for s in seeds]
                n_inc = min(len(m) for m in masks)
                steps = p["epochs"] * math.ceil(n_inc / p["batch"])
                history = []
                for t in range(steps):
                    batch_idx = [np.random.default_rng(1000 * s + t).choice(m, p["batch"], replace=len(m) < p["batch"])
                                 for s, m in zip(seeds, masks)]
                    t0 = time.perf_counter()
                    states, sq = step(states, jnp.asarray(np.stack([x_tr[b] for b in batch_idx])),
                                      jnp.asarray(np.stack([y_tr[b] for b in batch_idx])))
                    sq = np.asarray(sq)
                    seconds = time.perf_counter() - t0
                    if t == 0 and new_program:  # the first step of a new arm compiles it
                        PROCESS_STATS.programs += 1
                        PROCESS_STATS.compile_seconds += seconds
                    else:
                        PROCESS_STATS.run_seconds += seconds
                        timings.append(seconds / len(seeds))
                    history.append(sq)
                def accuracy(x, y):
                    return np.concatenate([np.asarray(evaluate(states, jnp.asarray(x[i:i + 128]), jnp.asarray(y[i:i + 128])))
                                           [:, None] * len(y[i:i + 128]) for i in range(0, len(y), 128)], axis=1).sum(1) / len(y)

                accs, vals = accuracy(x_te, y_te), accuracy(x_va, y_va)
                label = f"MiniLM+{head}" + ("+DREG" if dreg else "")
                for i, s in enumerate(seeds):
                    rows.append({"dataset": ds_name, "fraction": frac, "seed": s, "arm": label, "ok": True,
                                 "test": float(accs[i]), "val": float(vals[i]), "terms": [h[i].tolist() for h in history]})
                bar.update(1)
    bar.close()
    return rows, float(np.median(timings)) if timings else float("nan")


@functools.lru_cache(maxsize=None)
def _finetune_fns(classes, head, dreg, length, config):
    """``(model, init, step, evaluate)`` of one fine-tuning arm, compiled once and reused for
    every dataset and fraction (seeds vmapped)."""
    import optax
    from flax.training import train_state

    from dreg_jax.models import MiniLMClassifier, with_pretrained

    model = MiniLMClassifier(num_classes=classes, config=config, head=head)
    tx = optax.multi_transform({"encoder": optax.adam(5e-5), "head": optax.adam(1e-3)},
                               lambda params: {k: "encoder" if k == "encoder" else "head" for k in params})
    strength = LAMBDA / length

    def init(seed, encoder_vars):
        variables = with_pretrained(model.init(jax.random.key(seed), jnp.zeros((1, 2 * length))), encoder_vars)
        return train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)

    def loss_fn(params, x, y):
        logits, terms = dreg_jax.jacobian_terms(model, {"params": params}, x, scope="activation")
        sq = jnp.stack(list(terms.values()))
        data = jnp.mean(dreg_jax.training.regularizers.cross_entropy(logits, y))
        return data + (dreg_jax.dreg_penalty(sq, strength=strength) if dreg else 0.0), sq

    @jax.jit
    def step(states, xb, yb):
        def one(state, x, y):
            (_, sq), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params, x, y)
            return state.apply_gradients(grads=g), sq
        return jax.vmap(one)(states, xb, yb)

    @jax.jit
    def evaluate(states, x, y):
        logits = jax.vmap(lambda s: model.apply({"params": s.params}, x))(states)
        return jnp.mean(jnp.argmax(logits, -1) == y[None], axis=-1)

    return model, init, step, evaluate


def _start_penalty(encoder, encoder_vars, x, y, length):
    """DREG's penalty on one batch of 16 at the pretrained weights (linear head), for the report."""
    from dreg_jax.models import MiniLMClassifier, with_pretrained

    model = MiniLMClassifier(num_classes=int(y.max()) + 1, config=encoder.config)
    xb = jnp.asarray(x[:16])
    variables = with_pretrained(model.init(jax.random.key(0), xb), encoder_vars)
    _, terms = dreg_jax.jacobian_terms(model, variables, xb, scope="activation")
    return float(LAMBDA / length * sum(terms.values()))


def _frozen_head(e_tr, y_tr, e_te, y_te, classes, seed, steps=300):
    import optax

    w = jnp.zeros((e_tr.shape[1], classes)), jnp.zeros(classes)
    opt = optax.adam(1e-2)
    state = opt.init(w)
    x, y = jnp.asarray(e_tr), jnp.asarray(y_tr)

    @jax.jit
    def step(w, state):
        loss = lambda w: jnp.mean(dreg_jax.training.regularizers.cross_entropy(x @ w[0] + w[1], y))  # noqa: E731
        g = jax.grad(loss)(w)
        updates, state = opt.update(g, state)
        return optax.apply_updates(w, updates), state

    for _ in range(steps):
        w, state = step(w, state)
    return float(jnp.mean(jnp.argmax(jnp.asarray(e_te) @ w[0] + w[1], -1) == jnp.asarray(y_te)))


# ---------------------------------------------------------------- report

def _holm(pvalues):
    p = np.asarray(pvalues, float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def analyse(rows, reference_arms, pairs=None):
    """Means per (dataset, fraction, arm), mean ranks, and paired tests of each reference arm
    against every other arm over matched (dataset, fraction, seed) cells, Holm over all tests."""
    from dreg_jax.analysis.stats import average_ranks, paired_wilcoxon

    # a fixed order (a rebuilt report reads the rows in the results file's order)
    order = ["none", "WD", "SN", "DREG-act", "DREG-ffn", "IGPen", "JacReg", "frozen+linear", "MiniLM+linear",
             "MiniLM+linear+DREG", "MiniLM+chainzrule", "MiniLM+chainzrule+DREG"]
    present = set(r["arm"] for r in rows)
    arms = [a for a in order if a in present] + sorted(present - set(order))
    by = collections.defaultdict(dict)
    for r in rows:
        if r["ok"]:
            by[(r["dataset"], r["fraction"], r["seed"])][r["arm"]] = r["test"]
    out = {"arms": arms, "tests": [], "ranks": {}, "means": {}}
    cells = collections.defaultdict(list)
    for r in rows:
        if r["ok"]:
            cells[(r["dataset"], r["fraction"], r["arm"])].append(r["test"])
    out["means"] = {k: (float(np.mean(v)), float(np.std(v))) for k, v in cells.items()}
    groups = collections.defaultdict(list)  # arms present together -> matched cells
    for key, accs in by.items():
        groups[tuple(a for a in arms if a in accs)].append((key, accs))
    for present, matched in groups.items():
        scores = np.array([[accs[a] for a in present] for _, accs in matched])
        for a, rank in zip(present, average_ranks(scores)):
            out["ranks"][(present, a)] = float(rank)
        for ref in reference_arms:
            if ref not in present:
                continue
            for other in present:
                if other == ref or (pairs is not None and (ref, other) not in pairs):
                    continue
                res = paired_wilcoxon(scores[:, present.index(ref)], scores[:, present.index(other)])
                out["tests"].append({"group": present, "ref": ref, "vs": other, **res})
    adjusted = _holm([t["p"] for t in out["tests"]]) if out["tests"] else []
    for t, p in zip(out["tests"], adjusted):
        t["p_holm"] = float(p)
    return out


def _testable(a, n) -> bool:
    """Whether n matched cells can reach alpha = 0.05 after the strongest Holm step."""
    from dreg_jax.analysis.stats import smallest_wilcoxon_p

    return smallest_wilcoxon_p(n) * max(1, len(a["tests"])) <= 0.05


def _power(a) -> str:
    from dreg_jax.analysis.stats import smallest_wilcoxon_p

    ns = sorted({t["n"] for t in a["tests"]})
    return "; ".join(f"with n = {n} matched cells the smallest two-sided p is {smallest_wilcoxon_p(n):.3g}, "
                     f"{min(1.0, smallest_wilcoxon_p(n) * len(a['tests'])):.3g} after Holm's first step over "
                     f"{len(a['tests'])} tests: a difference {'can' if _testable(a, n) else 'CANNOT'} reach alpha = 0.05"
                     for n in ns) + "."


def _label(verdict: bool, tests, a) -> str:
    if verdict:
        return "SUPPORTED"
    if tests and not all(_testable(a, t["n"]) for t in tests):
        return "NOT SUPPORTED (underpowered: too few matched cells to reach alpha after correction)"
    return "NOT SUPPORTED"


def _verdicts(a, regime):
    lines = []
    groups = {}
    for (present, arm), rank in a["ranks"].items():
        groups.setdefault(present, {})[arm] = rank
    for present, ranks in groups.items():
        best = min(ranks, key=ranks.get)
        dregs = [x for x in present if "DREG" in x]
        label = "text" if "IGPen" not in present else "vision"
        if regime == "finetune":
            label = "fine-tuning"
        if regime == "scratch":
            tests = {t["vs"]: t for t in a["tests"] if t["group"] == present and t["ref"] in dregs and t["vs"] == "none"}
            verdict = _label(best in dregs and bool(tests) and all(t["p_holm"] <= 0.05 and t["mean_diff"] > 0
                                                                  for t in tests.values()), list(tests.values()), a)
            lines.append(f"- **DREG the best regularizer under GELU ({label} transformers from scratch)**: {verdict}. "
                         f"Best mean rank: {best} ({ranks[best]:.2f}); "
                         + ", ".join(f"{d} {ranks[d]:.2f}" for d in dregs) + ". "
                         + "; ".join(f"{t['ref']} vs none: {100 * t['mean_diff']:+.2f} pp, p = {t['p']:.3g} (Holm {t['p_holm']:.3g})"
                                     for t in a["tests"] if t["group"] == present and t["ref"] in dregs and t["vs"] == "none"))
        else:
            pairs = [t for t in a["tests"] if t["group"] == present and t["ref"].endswith("+DREG")
                     and t["vs"] == t["ref"].removesuffix("+DREG")]
            sig = [t for t in pairs if t["p_holm"] <= 0.05 and t["mean_diff"] > 0]
            lines.append(f"- **DREG helps a fine-tuned GELU transformer (apply it by default)**: "
                         f"{_label(bool(pairs) and len(sig) == len(pairs), pairs, a)}. "
                         + "; ".join(f"{t['ref']} vs {t['vs']}: {100 * t['mean_diff']:+.2f} pp, p = {t['p']:.3g} (Holm {t['p_holm']:.3g})"
                                     for t in pairs) + f". Best mean rank: {best} ({ranks[best]:.2f}).")
            fine = [t for t in a["tests"] if t["group"] == present and t["ref"] == "MiniLM+linear" and t["vs"] == "frozen+linear"]
            for t in fine:
                lines.append(f"- **Fine-tuning beats the frozen-embedding head (the papers' BERT regime over the frozen one)**: "
                             f"{_label(t['p_holm'] <= 0.05 and t['mean_diff'] > 0, [t], a)}. "
                             f"{100 * t['mean_diff']:+.2f} pp, p = {t['p']:.3g} (Holm {t['p_holm']:.3g}).")
    return lines


def write_report(rows, regime, p, out: pathlib.Path, seconds: float, step_seconds=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = sorted({r["arm"] for r in rows if "DREG" in r["arm"]})
    pairs = None
    if regime == "finetune":  # the comparisons the claims need, not every pair (power)
        pairs = {("MiniLM+linear+DREG", "MiniLM+linear"), ("MiniLM+chainzrule+DREG", "MiniLM+chainzrule"),
                 ("MiniLM+linear", "frozen+linear"), ("MiniLM+chainzrule", "MiniLM+linear")}
        refs = sorted({ref for ref, _ in pairs})
    a = analyse(rows, refs, pairs)
    lines = [f"# Transformer study - regime `{regime}`", "",
             f"{len(rows)} runs, {sum(not r['ok'] for r in rows)} not ok. {wall_time_text(out, seconds)}", "",
             f"Profile: {p}. DREG lambda = 10^-2.5 per token (see the script's docstring)."
             + (f" A stratified {VALIDATION_FRACTION:.0%} of each training split is held out for validation; weight "
                "decay is the normalized decoupled decay, 0.05 / sqrt(total steps) per step (as in the DREG study v2)."
                if regime == "scratch" else
                f" A stratified {VALIDATION_FRACTION:.0%} of each training split is held out; the train, validation "
                "and test subsets are drawn from the three splits, and each run's validation accuracy is kept in "
                "results.json."), ""]
    if step_seconds is not None:
        lines += [f"Measured fine-tuning cost on this machine ({jax.devices()[0]}): {step_seconds:.3f} s per "
                  f"optimizer step and run (batch {p['batch']}, {p['length']} tokens).", ""]
    lines += ["## Test accuracy (%), mean +- std over seeds", ""]
    arms = a["arms"]
    lines += ["| dataset | fraction | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for ds, frac in sorted({(r["dataset"], r["fraction"]) for r in rows}):
        cells = [a["means"].get((ds, frac, arm)) for arm in arms]
        lines.append(f"| {ds} | {frac:g} | " + " | ".join("" if c is None else f"{100 * c[0]:.2f} +- {100 * c[1]:.2f}"
                                                       for c in cells) + " |")
    lines += ["", "## Paired Wilcoxon tests over matched (dataset, fraction, seed) cells", "",
              "Two-sided; Holm correction over every test in this table. Power: " + _power(a), "",
              "| arms | arm | vs | n | wins/ties/losses | mean diff (pp) | p | p (Holm) |", "|---|---|---|---|---|---|---|---|"]
    for t in a["tests"]:
        lines.append(f"| {'/'.join(t['group'])} | {t['ref']} | {t['vs']} | {t['n']} | {t['wins']}/{t['ties']}/{t['losses']} | "
                     f"{100 * t['mean_diff']:+.2f} | {t['p']:.3g} | {t['p_holm']:.3g} |")
    lines += ["", "## The papers' claims beside our runs", ""] + _verdicts(a, regime)
    # per-layer terms over training
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = 0
    for arm in arms:
        series = [np.asarray(r["terms"], float) for r in rows if r["arm"] == arm and r["terms"] is not None and r["ok"]]
        if not series:
            continue
        length = min(len(s) for s in series)
        mean = np.mean([s[:length] for s in series], axis=0)
        if mean.ndim == 2:
            for layer in range(mean.shape[1]):
                ax.plot(mean[:, layer], label=f"{arm} L{layer}", lw=1)
                plotted += 1
    if plotted:
        ax.set_yscale("log")
        ax.set_xlabel("epoch" if regime == "scratch" else "step")
        ax.set_ylabel("per-layer activation-scope term s_l")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "dreg_terms.png", dpi=120)
        lines += ["", "## Per-layer DREG terms over training", "", "![terms](dreg_terms.png)", "",
                  "Mean over runs of each marked GELU's activation-scope term (sum of squared slopes, batch mean)."]
    plt.close(fig)
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def _add_arguments(parser):
    parser.add_argument("--regime", choices=REGIMES, default="scratch")


def main(argv=None):
    args, out = experiment_args(argv, __doc__, PROFILES, "transformer_study", add_arguments=_add_arguments,
                                run_label=lambda a: f"{a.regime}_{a.profile}")
    p = PROFILES[args.profile][args.regime]
    write_meta(out, "transformer_study", args.profile, regime=args.regime)
    start = time.perf_counter()
    if args.regime == "scratch":
        rows, step_seconds = run_scratch(p, out, not args.no_progress), None
    else:
        rows, step_seconds = finetune_runs(p, out, not args.no_progress)
        write_meta(out, "transformer_study", args.profile, regime=args.regime, step_seconds=step_seconds)
        # the custom loop keeps no results file of its own: the rows, for re-analysis
        (out / "results.json").write_text(json.dumps(rows))
    text = write_report(rows, args.regime, p, out, time.perf_counter() - start, step_seconds)
    print(text)
    print(f"wrote {out / 'report.md'}")
    print(compile_summary())
    return rows


def rebuild_report(out, meta) -> str:
    """The report from ``out``'s raw results (scratch: results.jsonl[.gz]; finetune: results.json)."""
    p = PROFILES[meta["profile"]][meta["regime"]]
    if meta["regime"] == "scratch":
        rows = scratch_rows(load_raw_results(out), scratch_specs(p)[1])
    else:
        if not (out / "results.json").exists():
            raise SystemExit(f"{out} has no results.json (the fine-tuning rows): nothing to rebuild from")
        rows = json.loads((out / "results.json").read_text())
    return write_report(rows, meta["regime"], p, out, None, meta.get("step_seconds"))


if __name__ == "__main__":
    main()
