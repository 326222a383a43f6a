"""Token ids as engine features: ``[ids, mask]`` rows in float32, split back by the models.

A simple hashed word vocabulary (``word_id_features``) needs no extra; all-MiniLM-L6-v2's
WordPiece ids come from :func:`dreg_jax.data.text.minilm_token_features`.
"""
from __future__ import annotations

import re
import zlib

import numpy as np

TOKEN_LENGTH = 64
WORD_VOCAB = 4096  # hashed word vocabulary of "word_ids": ids 2..WORD_VOCAB+1 (0 pad, 1 [CLS])


def token_features(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(n, 2 L)`` float32 rows ``[ids, mask]``: token ids as engine features (exact in float32
    below 2**24); models split and cast them back (:func:`split_tokens`)."""
    return np.concatenate([ids, mask], axis=1).astype(np.float32)


def split_tokens(x):
    """``(ids int32, mask int32)`` from :func:`token_features` rows (numpy or jax)."""
    length = x.shape[-1] // 2
    return x[..., :length].astype("int32"), x[..., length:].astype("int32")


def word_id_features(texts, length: int = TOKEN_LENGTH, vocab: int = WORD_VOCAB) -> np.ndarray:
    """A simple vocabulary: [CLS] then lowercased words hashed to ``vocab`` ids (no extra needed)."""
    ids = np.zeros((len(texts), length), np.int64)
    mask = np.zeros((len(texts), length), np.int64)
    for row, text in enumerate(texts):
        words = [1] + [2 + zlib.crc32(w.encode()) % vocab for w in re.findall(r"[a-z0-9']+", text.lower())]
        words = words[:length]
        ids[row, :len(words)] = words
        mask[row, :len(words)] = 1
    return token_features(ids, mask)
