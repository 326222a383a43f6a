"""Models beyond the MLP: a Flax BERT encoder with the pretrained all-MiniLM-L6-v2, and the
small transformer classifiers of the transformer study."""
from dreg_jax.models.bert import (
    BertConfig,
    BertEncoder,
    Tokenizer,
    bert_variables,
    load_bert,
    load_minilm,
    mean_pool,
)
from dreg_jax.models.transformer import (
    HEADS,
    MiniLMClassifier,
    TextTransformer,
    VisionTransformer,
    with_pretrained,
)
