"""Transformer study v2: GELU transformers trained to their plateau, every arm's strength
chosen on validation, a final comparison on fresh seeds, effect sizes with intervals.

The design and the analysis were fixed in ``docs/preregistration_transformer_v2.md`` before
any run of the ``cpu`` profile; the report links the commit that fixed it.

Regimes (``--regime``):

* ``scratch``: a small ViT on 8x8 digits (2x2 patches) and a pre-LN text transformer on review
  word ids (``dreg_jax.models``), trained by the engine as user modules. Arms: none, WD
  (normalized decoupled decay), SN (every block Dense), DREG-act (the FFN GELUs, activation
  scope), DREG-ffn (each block's FFN map, layer scope), and on the ViT IGPen and JacReg
  (input-gradient penalties are zero on token ids, so text leaves them out). Two more arms run
  DREG at the paper's fixed lambda = 10^-2.5 per token.
* ``finetune``: all-MiniLM-L6-v2 (pretrained, ``dreg_jax.models.load_minilm``) fine-tuned end to
  end with a linear head, without and with DREG on its six FFN GELUs (tuned, and at the fixed
  paper lambda per token); beside it the frozen-encoder linear head on the same rows.

Every run stops early: it scores its validation split after every epoch, stops once
``patience`` epochs in a row have not improved the best validation accuracy, and keeps the best
epoch's parameters (``EngineOptions(restore_best_epoch=True, patience=...)``; the fine-tuning
loop applies the same rule). The epoch cap is reported against the stops.

Stage 1 (tuning): one tuning draw per dataset (its own validation split), the tuning seed(s);
the scratch regime calls ``dreg_jax.tune`` (the function users call) for every arm with a
strength (log-spaced grid around the arm's centre, extended past an edge pick); the fine-tuning
loop picks with ``dreg_jax.tuning.choose`` and extends with ``edge_extension``, the two
functions ``tune`` is built from. No test row enters stage 1.

Stage 2 (final): every arm at its pick on fresh seeds; seed ``s`` draws its own validation split
(and, fine-tuning, its own training and validation subsets).

DREG strength per token: a transformer's FFN acts on every token, so the raw sum of the terms
grows with the sequence length; lambda is divided by the tokens (patches) per example, which
makes each token count as one MLP example (the v1 study's reading, kept).

Usage: python experiments/transformer_study_v2.py --regime scratch|finetune --profile quick|cpu|gpu [--out DIR]
"""
from __future__ import annotations

from _common import (compile_summary, cut_tokens, experiment_args, fast_compile_flags, last_commit_of,
                     read_jsonl_gz, write_jsonl_gz, write_meta)

fast_compile_flags()

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dreg_jax  # noqa: E402
from dreg_jax.data.registry import stratified_holdout  # noqa: E402
from dreg_jax.tuning import choose, edge_extension  # noqa: E402

LAMBDA = 10 ** -2.5
PATCHES = 16  # 8x8 digits in 2x2 patches
TUNING_DRAW = 1000  # the tuning stage's data draw and seed (final seeds are 0..n-1)
#: the centre of each strength grid (the DREG study's paper strengths; DREG per token below)
CENTRES = {"weight_decay": 0.05, "igpen": 1e-2, "jacobian": 1e-2}
DEVIATIONS: list[str] = []  # where a run departs from the pre-registration (the report lists them)


@dataclasses.dataclass(frozen=True)
class Profile:
    # scratch
    vision: tuple = ("digits", "digits_corrupted")
    text: tuple = ("reviews", "reviews_noisy")
    text_tokens: int = 32  # word ids per review (of the featurizer's 64)
    width: int = 64
    depth: int = 2
    heads: int = 4
    ffn: int = 128
    batch: int = 64
    learning_rate: float = 1e-3  # Adam, every arm (not tuned: the strengths are)
    vision_epochs: int = 100  # caps; the curves show whether they bind
    text_epochs: int = 30
    vision_patience: int = 10
    text_patience: int = 5
    # both regimes
    tuning_seeds: int = 1
    final_seeds: int = 5
    points: int = 4  # strengths per arm, log-spaced over +-decades around the centre
    decades: float = 1.5
    max_extensions: int = 1
    validation_share: float = 0.2
    # finetune
    ft_datasets: tuple = ("reviews", "reviews_noisy")
    ft_train: int = 768
    ft_val: int = 256
    ft_test: int = 512
    ft_length: int = 32
    ft_batch: int = 16
    ft_epochs: int = 4
    ft_patience: int = 1
    ft_seeds: int = 3
    ft_decades: tuple = (-3.0, -2.0, -1.0, 0.0)  # DREG strengths: centre x 10^d (below the v1 start)
    # analysis
    margin: float = 0.5  # equivalence margin, percentage points
    alpha: float = 0.05
    bootstrap: int = 4000


PROFILES = {
    "cpu": Profile(),  # docs/preregistration_transformer_v2.md
    # the slow suite's end-to-end check (minutes on a CPU)
    "quick": Profile(vision=("digits",), text=("reviews_noisy",), text_tokens=16, width=16, depth=1, heads=2, ffn=32,
                     vision_epochs=6, text_epochs=3, vision_patience=2, text_patience=1, final_seeds=2, points=2,
                     decades=1.0, ft_train=48, ft_val=32, ft_test=48, ft_length=16, ft_epochs=2, ft_seeds=2,
                     ft_decades=(-1.0, 0.0), bootstrap=200),
    # one GPU: the same design at real scale (full sequences, both reviews sets, more seeds)
    "gpu": Profile(vision=("digits", "digits_corrupted"), text=("reviews", "reviews_noisy"), text_tokens=64,
                   width=128, depth=4, heads=4, ffn=256, vision_epochs=200, text_epochs=60, tuning_seeds=2,
                   final_seeds=10, points=5, decades=2.0, max_extensions=2, ft_datasets=("reviews", "reviews_noisy"),
                   ft_train=3200, ft_val=800, ft_test=993, ft_length=64, ft_batch=32, ft_epochs=8, ft_patience=2,
                   ft_seeds=5, ft_decades=(-4.0, -3.0, -2.0, -1.0, 0.0)),
}
REGIMES = ("scratch", "finetune")


def preregistration_commit() -> str | None:
    """The commit that last changed the pre-registration (None outside a git checkout)."""
    return last_commit_of("docs/preregistration_transformer_v2.md")


def strength_grid(centre: float, profile: Profile) -> list[float]:
    return [float(centre * 10 ** e) for e in np.linspace(-profile.decades, profile.decades, profile.points)]


# ---------------------------------------------------------------- data draws

@functools.lru_cache(maxsize=None)
def base_data(name: str, modality: str, tokens: int):
    """``(x_train, y_train, x_test, y_test, classes)`` of a built-in set (text cut to ``tokens``)."""
    from dreg_jax.data import load_dataset

    ds = load_dataset(name, featurizer="word_ids" if modality == "text" else "hashed")
    x_tr, x_te = np.asarray(ds.x_train), np.asarray(ds.x_test)
    if modality == "text":
        x_tr, x_te = cut_tokens(x_tr, tokens), cut_tokens(x_te, tokens)
    return x_tr, np.asarray(ds.y_train), x_te, np.asarray(ds.y_test), ds.num_classes


def draw(name: str, modality: str, seed: int, profile: Profile, tuning: bool):
    """The engine's arrays of one data draw: a stratified ``validation_share`` of the training
    split is its validation split (the draw's own rows), the rest trains. A tuning draw carries
    the validation rows where the test rows would be (no test row enters stage 1; ``tune``
    scores the validation split only anyway)."""
    from dreg_jax.engine import EngineData

    x, y, x_te, y_te, classes = base_data(name, modality, profile.text_tokens)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    val = stratified_holdout(y, profile.validation_share, rng)
    if tuning:
        x_te, y_te = x[val], y[val]
    return EngineData(jnp.asarray(x[~val]), jnp.asarray(y[~val]), jnp.asarray(x_te), jnp.asarray(y_te), None,
                      jnp.asarray(x[val]), jnp.asarray(y[val])), classes


# ---------------------------------------------------------------- scratch (the engine, dreg_jax.tune)

def scratch_arms(modality: str, profile: Profile, classes: int) -> dict:
    """``arm -> (module, RegularizerConfig, jacobian_layers, centre strength or None)``."""
    from dreg_jax.data.text import WORD_VOCAB
    from dreg_jax.models import TextTransformer, VisionTransformer

    def module(spectral_norm=False):
        common = dict(num_classes=classes, width=profile.width, depth=profile.depth, num_heads=profile.heads,
                      ffn_hidden=profile.ffn, spectral_norm=spectral_norm)
        if modality == "text":
            return TextTransformer(vocab_size=WORD_VOCAB + 2, **common)
        return VisionTransformer(**common)

    tokens = profile.text_tokens if modality == "text" else PATCHES
    ffn = tuple(f"encoder/block_{i}/ffn" for i in range(profile.depth))
    R = dreg_jax.RegularizerConfig
    dreg = LAMBDA / tokens
    arms = {"none": (module(), R("none"), (), None),
            "WD": (module(), R("weight_decay", weight_decay_reading="normalized"), (), CENTRES["weight_decay"]),
            "SN": (module(True), R("none"), (), None),
            "DREG-act": (module(), R("dreg"), (), dreg),
            "DREG-ffn": (module(), R("dreg", dreg_scope="layer"), ffn, dreg)}
    if modality == "vision":
        arms["IGPen"] = (module(), R("igpen"), (), CENTRES["igpen"])
        arms["JacReg"] = (module(), R("jacobian"), (), CENTRES["jacobian"])
    return arms


FIXED = {"DREG-act fixed": "DREG-act", "DREG-ffn fixed": "DREG-ffn"}  # the paper's lambda, no tuning


def scratch_config(modality, arm_def, profile: Profile):
    module, reg, layers, _ = arm_def
    epochs = profile.text_epochs if modality == "text" else profile.vision_epochs
    return dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(module=module, activation="custom", jacobian_layers=layers),
                                regularizer=reg, epochs=epochs, batch_size=profile.batch,
                                optimizer=dreg_jax.OptimizerConfig(learning_rate=profile.learning_rate))


def scratch_options(modality, profile: Profile):
    from dreg_jax.engine import EngineOptions

    patience = profile.text_patience if modality == "text" else profile.vision_patience
    # one run per compiled call: each run stops on its own (transformers vmap poorly on a CPU)
    return EngineOptions(per_epoch_diagnostics=False, restore_best_epoch=True, patience=patience, vmap_width=1)


class Store:
    """Append-only JSONL of finished rows, keyed, so an interrupted study resumes where it stopped."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.rows = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    def get(self, key):
        return self.rows.get(key)

    def put(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        self.rows[row["key"]] = row
        return row


def _curve(values) -> list:
    """A per-epoch curve up to the stop (NaN entries after it dropped), 7 significant digits."""
    return [float(f"{v:.7g}") for v in np.asarray(values, np.float64) if np.isfinite(v)]


def run_scratch(profile: Profile, out: pathlib.Path, progress: bool):
    from tqdm.auto import tqdm

    from dreg_jax.engine import RunHParams, train_many

    store = Store(out / "rows.jsonl")
    datasets = [("vision", d) for d in profile.vision] + [("text", d) for d in profile.text]
    total = sum(len(scratch_arms(m, profile, 2)) + len(FIXED) for m, _ in datasets)
    bar = tqdm(total=total, desc="scratch arms", disable=not progress)
    tuning_seeds = tuple(TUNING_DRAW + i for i in range(profile.tuning_seeds))
    for modality, name in datasets:
        tune_data, classes = draw(name, modality, TUNING_DRAW, profile, tuning=True)
        arms = scratch_arms(modality, profile, classes)
        options = scratch_options(modality, profile)
        for arm in [*arms, *FIXED]:
            base = FIXED.get(arm, arm)
            arm_def = arms[base]
            config = scratch_config(modality, arm_def, profile)
            key = f"tune|{name}|{arm}"
            pick = store.get(key)
            if pick is None:
                t0 = time.perf_counter()
                if arm in FIXED:  # no tuning: the paper's lambda per token
                    pick = {"strength": arm_def[3], "learning_rate": profile.learning_rate, "rows": [], "extensions": 0,
                            "on_edge": False, "note": "fixed"}
                else:
                    grid = None if arm_def[3] is None else strength_grid(arm_def[3], profile)
                    result = dreg_jax.tune(tune_data, config, classes, strengths=grid,
                                           learning_rates=(profile.learning_rate,), seeds=tuning_seeds,
                                           max_extensions=profile.max_extensions, options=options, keep_model=False)
                    pick = {"strength": result.strength, "learning_rate": result.learning_rate,
                            "rows": list(result.rows), "extensions": result.extensions, "on_edge": result.on_edge,
                            "note": result.note}
                pick = store.put({"key": key, "stage": "tuning", "regime": "scratch", "modality": modality,
                                  "dataset": name, "arm": arm, **pick, "seconds": time.perf_counter() - t0})
            for seed in range(profile.final_seeds):
                key = f"final|{name}|{arm}|{seed}"
                if store.get(key) is not None:
                    continue
                data, _ = draw(name, modality, seed, profile, tuning=False)
                t0 = time.perf_counter()
                run = RunHParams.stack([RunHParams(seed=seed, learning_rate=pick["learning_rate"],
                                                   strength=pick["strength"] or 0.0)])
                final, curves = train_many(run, data, config, classes, options)
                store.put({"key": key, "stage": "final", "regime": "scratch", "modality": modality, "dataset": name,
                           "arm": arm, "seed": seed, "strength": pick["strength"],
                           "learning_rate": pick["learning_rate"],
                           "ok": bool(np.isfinite(final["test_accuracy"][0])),
                           "test": float(final["test_accuracy"][0]),
                           "validation": float(final["validation_accuracy"][0]),
                           "best_epoch": int(final["best_epoch"][0]), "epochs_run": int(final["epochs_run"][0]),
                           "cap": config.epochs, "train_rows": int(len(data.y_train)),
                           "curves": {"validation_accuracy": _curve(curves["validation_accuracy"][0]),
                                      "test_accuracy": _curve(curves["test_accuracy"][0]),
                                      "train_loss": _curve(curves["train_loss"][0])},
                           "seconds": time.perf_counter() - t0})
            bar.update(1)
    bar.close()
    return list(store.rows.values())


# ---------------------------------------------------------------- finetune (a custom loop)

def _subset(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of a class-stratified subset of ``size`` rows (all rows when ``size`` >= them)."""
    if size >= len(y):
        return np.arange(len(y))
    keep = stratified_holdout(y, size / len(y), np.random.default_rng(seed))
    return np.flatnonzero(keep)


@functools.lru_cache(maxsize=None)
def finetune_data(name: str, profile: Profile):
    """The MiniLM token rows of a reviews set: the training split (validation rows drawn from
    it per draw) and a fixed stratified test subset."""
    from dreg_jax.data import load_dataset

    ds = load_dataset(name, featurizer="minilm_tokens")
    x, y = cut_tokens(np.asarray(ds.x_train), profile.ft_length), np.asarray(ds.y_train)
    x_te, y_te = cut_tokens(np.asarray(ds.x_test), profile.ft_length), np.asarray(ds.y_test)
    test = _subset(y_te, profile.ft_test, 7)
    return x, y, x_te[test], y_te[test], ds.num_classes


def finetune_draw(name: str, seed: int, profile: Profile):
    """One draw's training and validation rows (disjoint, both stratified, from the training split)."""
    x, y, *_ = finetune_data(name, profile)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    val = stratified_holdout(y, profile.validation_share, rng)
    tr_idx, va_idx = np.flatnonzero(~val), np.flatnonzero(val)
    tr_idx = tr_idx[_subset(y[tr_idx], profile.ft_train, seed)]
    va_idx = va_idx[_subset(y[va_idx], profile.ft_val, seed + 1)]
    return x[tr_idx], y[tr_idx], x[va_idx], y[va_idx]


@functools.lru_cache(maxsize=None)
def _finetune_fns(classes: int, dreg: bool, length: int, config):
    """``(init, step, accuracy)`` of one fine-tuning arm; the DREG strength is an argument of
    ``step`` (one program serves every strength)."""
    import optax
    from flax.training import train_state

    from dreg_jax.models import MiniLMClassifier, with_pretrained

    model = MiniLMClassifier(num_classes=classes, config=config, head="linear")
    tx = optax.multi_transform({"encoder": optax.adam(5e-5), "head": optax.adam(1e-3)},
                               lambda params: {k: "encoder" if k == "encoder" else "head" for k in params})

    def init(seed, encoder_vars):
        variables = with_pretrained(model.init(jax.random.key(seed), jnp.zeros((1, 2 * length))), encoder_vars)
        return train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)

    def loss_fn(params, x, y, strength):
        if not dreg:
            logits = model.apply({"params": params}, x)
            return jnp.mean(dreg_jax.training.regularizers.cross_entropy(logits, y))
        logits, terms = dreg_jax.jacobian_terms(model, {"params": params}, x, scope="activation")
        data = jnp.mean(dreg_jax.training.regularizers.cross_entropy(logits, y))
        return data + dreg_jax.dreg_penalty(jnp.stack(list(terms.values())), strength=strength)

    @jax.jit
    def step(state, x, y, strength):
        grads = jax.grad(loss_fn)(state.params, x, y, strength)
        return state.apply_gradients(grads=grads)

    @jax.jit
    def correct(params, x, y):
        return jnp.sum(jnp.argmax(model.apply({"params": params}, x), -1) == y)

    def accuracy(params, x, y):
        return float(sum(int(correct(params, jnp.asarray(x[i:i + 128]), jnp.asarray(y[i:i + 128])))
                         for i in range(0, len(y), 128)) / len(y))

    return init, step, accuracy


def finetune_run(name: str, seed: int, strength, profile: Profile, encoder, encoder_vars, x_te=None, y_te=None):
    """One fine-tuning run with early stopping (validation after every epoch, ``ft_patience``,
    the best epoch's parameters kept). ``strength`` None: no DREG. Returns the row's fields."""
    from dreg_jax.engine.grid import PROCESS_STATS

    x_tr, y_tr, x_va, y_va = finetune_draw(name, seed, profile)
    classes = finetune_data(name, profile)[4]
    built = _finetune_fns.cache_info().misses
    init, step, accuracy = _finetune_fns(classes, strength is not None, profile.ft_length, encoder.config)
    new_program = _finetune_fns.cache_info().misses > built
    state = init(seed, encoder_vars)
    best = (state.params, -1.0, 0)
    val_curve, steps_per_epoch = [], math.ceil(len(y_tr) / profile.ft_batch)
    s = jnp.float32(strength or 0.0)
    for epoch in range(profile.ft_epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(y_tr))
        order = np.resize(order, steps_per_epoch * profile.ft_batch)  # the last batch wraps around
        for t in range(steps_per_epoch):
            idx = order[t * profile.ft_batch:(t + 1) * profile.ft_batch]
            t0 = time.perf_counter()
            state = step(state, jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx]), s)
            jax.block_until_ready(state.params)
            seconds = time.perf_counter() - t0
            if new_program and epoch == 0 and t == 0:  # the first step of a new arm compiles it
                PROCESS_STATS.programs += 1
                PROCESS_STATS.compile_seconds += seconds
            else:
                PROCESS_STATS.run_seconds += seconds
        val = accuracy(state.params, x_va, y_va)
        val_curve.append(val)
        if val > best[1]:
            best = (state.params, val, epoch)
        elif epoch - best[2] >= profile.ft_patience:
            break
    fields = {"validation": best[1], "best_epoch": best[2] + 1, "epochs_run": len(val_curve),
              "cap": profile.ft_epochs, "train_rows": int(len(y_tr)),
              "curves": {"validation_accuracy": _curve(val_curve)}}
    if x_te is not None:
        fields["test"] = accuracy(best[0], x_te, y_te)
    return fields


def _frozen_head(e_tr, y_tr, e_va, y_va, e_te, y_te, classes, steps=300):
    """The frozen-encoder linear head: full-batch Adam on the pooled embeddings, the step count
    with the best validation accuracy (checked every 25 steps) kept."""
    import optax

    w = (jnp.zeros((e_tr.shape[1], classes)), jnp.zeros(classes))
    opt = optax.adam(1e-2)
    state = opt.init(w)
    x, y = jnp.asarray(e_tr), jnp.asarray(y_tr)

    @jax.jit
    def step(w, state):
        g = jax.grad(lambda w: jnp.mean(dreg_jax.training.regularizers.cross_entropy(x @ w[0] + w[1], y)))(w)
        updates, state = opt.update(g, state)
        return optax.apply_updates(w, updates), state

    def acc(w, e, yy):
        return float(jnp.mean(jnp.argmax(jnp.asarray(e) @ w[0] + w[1], -1) == jnp.asarray(yy)))

    best = (w, -1.0)
    for t in range(1, steps + 1):
        w, state = step(w, state)
        if t % 25 == 0 and (v := acc(w, e_va, y_va)) > best[1]:
            best = (w, v)
    return best[1], acc(best[0], e_te, y_te)


def run_finetune(profile: Profile, out: pathlib.Path, progress: bool):
    from tqdm.auto import tqdm

    from dreg_jax.models import load_minilm, mean_pool
    from dreg_jax.models.bert import BertEncoder
    from dreg_jax.models.tokens import split_tokens

    encoder, encoder_vars, _ = load_minilm()
    store = Store(out / "rows.jsonl")
    centre = LAMBDA / profile.ft_length
    grid = [float(centre * 10 ** d) for d in profile.ft_decades]
    step = profile.ft_decades[1] - profile.ft_decades[0] if len(profile.ft_decades) > 1 else 1.0
    bar = tqdm(total=len(profile.ft_datasets) * (len(grid) + 3 * profile.ft_seeds + 1), desc="finetune runs",
               disable=not progress)
    embed = jax.jit(lambda x: mean_pool(BertEncoder(encoder.config).apply(encoder_vars, *split_tokens(x)),
                                        split_tokens(x)[1], normalize=False))

    def embeddings(x):
        return np.concatenate([np.asarray(embed(jnp.asarray(x[i:i + 64]))) for i in range(0, len(x), 64)])

    for name in profile.ft_datasets:
        _, _, x_te, y_te, classes = finetune_data(name, profile)
        # stage 1: DREG's strength on the tuning draw (validation only), grid extended past an edge pick
        accuracy = {}
        for s in grid:
            key = f"tune|{name}|MiniLM+DREG|{s:.6g}"
            row = store.get(key) or store.put({"key": key, "stage": "tuning", "regime": "finetune", "dataset": name,
                                               "arm": "MiniLM+DREG", "strength": s, "seed": TUNING_DRAW,
                                               **finetune_run(name, TUNING_DRAW, s, profile, encoder, encoder_vars)})
            accuracy[(s, 0.0)] = [row["validation"]]
            bar.update(1)
        extensions = 0
        while extensions < profile.max_extensions and (beyond := edge_extension(accuracy, step)) is not None:
            key = f"tune|{name}|MiniLM+DREG|{beyond:.6g}"
            row = store.get(key) or store.put({"key": key, "stage": "tuning", "regime": "finetune", "dataset": name,
                                               "arm": "MiniLM+DREG", "strength": beyond, "seed": TUNING_DRAW,
                                               **finetune_run(name, TUNING_DRAW, beyond, profile, encoder,
                                                              encoder_vars)})
            accuracy[(beyond, 0.0)] = [row["validation"]]
            extensions += 1
        pick = choose(accuracy)[0]
        on_edge = edge_extension(accuracy, step) is not None
        key = f"pick|{name}"
        store.get(key) or store.put({"key": key, "stage": "pick", "regime": "finetune", "dataset": name,
                                     "arm": "MiniLM+DREG", "strength": pick, "extensions": extensions,
                                     "on_edge": on_edge})
        # stage 2: fresh seeds, each its own training and validation subsets
        arms = {"MiniLM+linear": None, "MiniLM+DREG": pick, "MiniLM+DREG fixed": centre}
        for seed in range(profile.ft_seeds):
            for arm, strength in arms.items():
                key = f"final|{name}|{arm}|{seed}"
                if store.get(key) is None:
                    t0 = time.perf_counter()
                    fields = finetune_run(name, seed, strength, profile, encoder, encoder_vars, x_te, y_te)
                    store.put({"key": key, "stage": "final", "regime": "finetune", "dataset": name, "arm": arm,
                               "seed": seed, "strength": strength, "ok": True, **fields,
                               "seconds": time.perf_counter() - t0})
                bar.update(1)
            key = f"final|{name}|frozen+linear|{seed}"
            if store.get(key) is None:
                x_tr, y_tr, x_va, y_va = finetune_draw(name, seed, profile)
                val, test = _frozen_head(embeddings(x_tr), y_tr, embeddings(x_va), y_va, embeddings(x_te), y_te,
                                         classes)
                store.put({"key": key, "stage": "final", "regime": "finetune", "dataset": name,
                           "arm": "frozen+linear", "seed": seed, "strength": None, "ok": True, "validation": val,
                           "test": test, "train_rows": int(len(y_tr)), "curves": {}})
        bar.update(1)
    bar.close()
    return list(store.rows.values())


# ---------------------------------------------------------------- main

def write_rows(path: pathlib.Path, rows):
    """The committed raw results: every row (tuning and final), sorted by key."""
    write_jsonl_gz(path, sorted(rows, key=lambda r: r["key"]))


read_rows = read_jsonl_gz


def _add_arguments(parser):
    parser.add_argument("--regime", choices=REGIMES, default="scratch")


def main(argv=None):
    args, out = experiment_args(argv, __doc__, PROFILES, "transformer_study_v2", add_arguments=_add_arguments,
                                run_label=lambda a: f"{a.regime}_{a.profile}")
    profile = PROFILES[args.profile]
    print(f"Transformer study v2, regime {args.regime}, profile {args.profile} -> {out}", flush=True)
    start = time.perf_counter()
    run = run_scratch if args.regime == "scratch" else run_finetune
    rows = run(profile, out, not args.no_progress)
    wall = time.perf_counter() - start
    from dreg_jax.engine.grid import PROCESS_STATS
    from transformer_study_v2_analysis import count_tuning_runs

    write_rows(out / "results.jsonl.gz", rows)
    meta = write_meta(out, "transformer_study_v2", args.profile, regime=args.regime, design=dataclasses.asdict(profile),
                      preregistration_commit=preregistration_commit(), deviations=DEVIATIONS,
                      wall_seconds=round(wall, 1), compiled_programs=PROCESS_STATS.programs,
                      compile_seconds=round(PROCESS_STATS.compile_seconds, 1),
                      run_seconds=round(PROCESS_STATS.run_seconds, 1), backend=str(jax.devices()[0].platform),
                      tuning_runs=count_tuning_runs(rows),
                      final_runs=sum(r["stage"] == "final" for r in rows))
    from transformer_study_v2_analysis import write_report

    print(write_report(read_rows(out / "results.jsonl.gz"), out, meta))
    print(f"\nwrote {out / 'report.md'}; {meta['tuning_runs']} tuning + {meta['final_runs']} final runs in {wall:.0f}s")
    print(compile_summary())


def rebuild_report(out, meta) -> str:
    """The report from the committed rows and ``meta.json`` (experiments/rebuild_report.py)."""
    from transformer_study_v2_analysis import write_report

    return write_report(read_rows(pathlib.Path(out) / "results.jsonl.gz"), pathlib.Path(out), meta)


if __name__ == "__main__":
    main()
