r"""Small transformer classifiers for the transformer study, as engine-ready linen modules.

Every module maps ``(batch, features)`` float rows to ``(batch, classes)`` logits, so the engine
trains it like the MLP (``ModelConfig(module=...)``):

* :class:`TextTransformer`: token rows from ``data.text.token_features`` (ids, then mask);
  embeddings + learned positions, pre-LN blocks, final LayerNorm, masked mean, linear head.
* :class:`VisionTransformer`: flattened images cut into non-overlapping patches (a small ViT).
* :class:`MiniLMClassifier`: the pretrained MiniLM encoder (:mod:`dreg_jax.models.bert`),
  masked mean pooling and a linear or ChainzRule head (for fine-tuning).

A pre-LN block: :math:`h \leftarrow h + \mathrm{Attn}(\mathrm{LN}(h))`, then
:math:`h \leftarrow h + \mathrm{FFN}(\mathrm{LN}(h))` with
:math:`\mathrm{FFN}(u) = W_2\,\mathrm{GELU}(W_1 u + b_1) + b_2`; the GELU is a
:class:`dreg_jax.Activation` (DREG's activation scope) and the FFN is the submodule
``block_{i}/ffn`` (DREG's layer scope: the Jacobian of the FFN map alone, the residual
excluded). ``spectral_norm=True`` wraps every Dense of the blocks in ``nn.SpectralNorm`` (one
power iteration per training call, when ``batch_stats`` is mutable).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreg_jax.models.tokens import split_tokens
from dreg_jax.layers.chainzrule import ChainzRule
from dreg_jax.layers.elementwise import Activation
from dreg_jax.models.bert import BertConfig, BertEncoder, mean_pool


class _Dense(nn.Module):
    """A Dense layer, spectrally normalized when asked (stats updated while they are mutable)."""

    features: int
    spectral_norm: bool = False

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(self.features)
        if not self.spectral_norm:
            return dense(x)
        return nn.SpectralNorm(dense)(x, update_stats=self.is_mutable_collection("batch_stats"))


class Attention(nn.Module):
    num_heads: int
    spectral_norm: bool = False

    @nn.compact
    def __call__(self, h, mask):
        b, s, d = h.shape
        dh = d // self.num_heads
        q, k, v = (_Dense(d, self.spectral_norm, name=n)(h).reshape(b, s, self.num_heads, dh)
                   for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(dh))
        scores = jnp.where(mask[:, None, None, :] > 0, scores, jnp.finfo(scores.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, s, d)
        return _Dense(d, self.spectral_norm, name="output")(out)


class FeedForward(nn.Module):
    hidden: int
    spectral_norm: bool = False

    @nn.compact
    def __call__(self, u):
        z = Activation(nn.gelu, name="gelu")(_Dense(self.hidden, self.spectral_norm, name="intermediate")(u))
        return _Dense(u.shape[-1], self.spectral_norm, name="output")(z)


class PreLNBlock(nn.Module):
    num_heads: int
    ffn_hidden: int
    spectral_norm: bool = False

    @nn.compact
    def __call__(self, h, mask):
        h = h + Attention(self.num_heads, self.spectral_norm, name="attention")(nn.LayerNorm(name="norm_attention")(h), mask)
        return h + FeedForward(self.ffn_hidden, self.spectral_norm, name="ffn")(nn.LayerNorm(name="norm_ffn")(h))


class _Encoder(nn.Module):
    width: int
    depth: int
    num_heads: int
    ffn_hidden: int
    spectral_norm: bool = False

    @nn.compact
    def __call__(self, h, mask):
        h = h + self.param("positions", nn.initializers.normal(0.02), (h.shape[1], self.width))
        for i in range(self.depth):
            h = PreLNBlock(self.num_heads, self.ffn_hidden, self.spectral_norm, name=f"block_{i}")(h, mask)
        return mean_pool(nn.LayerNorm(name="norm_final")(h), mask, normalize=False)


class TextTransformer(nn.Module):
    """Token rows ``[ids, mask]`` (``data.text.token_features``) -> logits."""

    num_classes: int
    vocab_size: int
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    ffn_hidden: int = 128
    spectral_norm: bool = False

    @nn.compact
    def __call__(self, x):
        ids, mask = split_tokens(x)
        ids = jnp.clip(ids, 0, self.vocab_size - 1)
        h = nn.Embed(self.vocab_size, self.width, name="embed")(ids)
        pooled = _Encoder(self.width, self.depth, self.num_heads, self.ffn_hidden, self.spectral_norm, name="encoder")(h, mask)
        return nn.Dense(self.num_classes, name="head")(pooled)


class VisionTransformer(nn.Module):
    """Flattened ``image_shape`` images -> logits, over ``patch x patch`` patches."""

    num_classes: int
    image_shape: tuple = (8, 8)
    patch: int = 2
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    ffn_hidden: int = 128
    spectral_norm: bool = False

    @nn.compact
    def __call__(self, x):
        rows, cols = self.image_shape
        p = self.patch
        if x.shape[-1] != rows * cols or rows % p or cols % p:
            raise ValueError(f"expected rows of {rows}x{cols} pixels in {p}x{p} patches, got {x.shape[-1]} features")
        patches = x.reshape(-1, rows // p, p, cols // p, p).transpose(0, 1, 3, 2, 4).reshape(x.shape[0], -1, p * p)
        h = nn.Dense(self.width, name="patch_embed")(patches)
        mask = jnp.ones(h.shape[:2], jnp.int32)
        pooled = _Encoder(self.width, self.depth, self.num_heads, self.ffn_hidden, self.spectral_norm, name="encoder")(h, mask)
        return nn.Dense(self.num_classes, name="head")(pooled)


HEADS = ("linear", "chainzrule")


class MiniLMClassifier(nn.Module):
    """MiniLM (or any :class:`BertConfig`) + masked mean pooling + a linear or ChainzRule head.

    Parameters: ``encoder`` (load pretrained weights into it: :func:`with_pretrained`) and
    ``head``. The ChainzRule head is ``Dense(head_hidden) -> ChainzRule -> Dense(classes)``.
    """

    num_classes: int
    config: BertConfig = BertConfig()
    head: str = "linear"
    head_hidden: int = 64

    @nn.compact
    def __call__(self, x):
        ids, mask = split_tokens(x)
        pooled = mean_pool(BertEncoder(self.config, name="encoder")(ids, mask), mask, normalize=False)
        if self.head == "linear":
            return nn.Dense(self.num_classes, name="head")(pooled)
        if self.head != "chainzrule":
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        z = nn.Dense(self.head_hidden, name="head_hidden")(pooled)
        return nn.Dense(self.num_classes, name="head")(ChainzRule(name="head_chainzrule")(z))


def with_pretrained(variables: dict, encoder_variables: dict) -> dict:
    """``variables`` of a :class:`MiniLMClassifier` with the encoder's replaced by pretrained ones."""
    params = dict(variables["params"])
    params["encoder"] = encoder_variables["params"]
    return {**variables, "params": params}
