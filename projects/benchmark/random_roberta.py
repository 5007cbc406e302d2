"""A stand-in for roberta-base that needs no download: its architecture with random weights, and
a byte-level BPE tokenizer of its size (50,265 tokens) and special ids, so that a "full"
captioning vocabulary costs what the paper's does."""
from __future__ import annotations

import os

ROBERTA_BASE_VOCAB = 50265


def write_random_roberta_base(folder: str, corpus, vocab_size: int = ROBERTA_BASE_VOCAB, weights: bool = True,
                              **architecture) -> None:
    """Saves model and tokenizer to ``folder`` (loadable by ``from_pretrained``). Special ids:
    <s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last. The merges are trained on ``corpus`` (so its
    words get realistic token counts), then two-symbol merges fill the vocabulary up.

    ``weights=False`` saves the config only (for ``MODEL.TEXT_ENCODER.RANDOM_INIT``, which
    initialises the model itself); ``architecture`` overrides ``RobertaConfig`` fields (e.g.
    ``num_hidden_layers=2, hidden_size=64`` for a tiny encoder)."""
    from tokenizers import ByteLevelBPETokenizer, pre_tokenizers
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size - 1, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    vocab = dict(sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]))
    bpe.save_model(folder)
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line.strip()]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pairs = ((a, b) for a in alphabet for b in alphabet if a + b not in vocab)
    while len(vocab) < vocab_size - 1:
        a, b = next(pairs)
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    vocab["<mask>"] = len(vocab)
    RobertaTokenizerFast(vocab=vocab, merges=merges, model_max_length=512).save_pretrained(folder)  # roberta-base's limit
    config = RobertaConfig(vocab_size=vocab_size, **architecture)
    if weights:
        RobertaModel(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
