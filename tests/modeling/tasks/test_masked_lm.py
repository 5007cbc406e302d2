"""Masked language modelling through the public API (``model(inputs, task="MLM")`` and
``MaskedLMEvaluator``): the loss counts the masked positions only, and eval returns
predictions and labels at the masked positions only (-100 elsewhere), reproducibly.

The masking itself is random; to pin which positions count, one test replaces the public
``up2.modeling.tasks.masked_lm.mask_tokens`` by a fixed choice that keeps every input token
(BERT's "unchanged" case), so the network sees the same text whatever is chosen."""
import pytest
import torch

from task_models import mapped_inputs, tiny_model
from up2.evaluation import MaskedLMEvaluator
from up2.modeling.tasks import masked_lm

IGNORE = -100


@pytest.fixture(scope="module")
def mlm_model(shapes_datasets):
    return tiny_model({"MLM": ("masked_lm", {"VOCABULARY": "dataset"})})


def _eval(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(inputs, task="MLM")


def test_training_loss_is_finite(mlm_model):
    cfg, model = mlm_model
    inputs = mapped_inputs(cfg, model, "MLM", n=4, is_train=True)
    assert all(isinstance(x["text"], str) for x in inputs)
    model.train()
    torch.manual_seed(0)
    losses = model(inputs, task="MLM")
    assert set(losses) == {"loss_mlm"} and losses["loss_mlm"].dim() == 0
    assert torch.isfinite(losses["loss_mlm"]) and losses["loss_mlm"] > 0 and losses["loss_mlm"].requires_grad


def _fixed_choice(chosen, calls):
    """A stand-in for ``mask_tokens`` choosing the (text, position) pairs ``chosen`` and
    keeping the input tokens unchanged there."""
    def mask_tokens(ids, maskable, mask_id, random_pool, prob=0.15, generator=None):
        calls.append(ids.shape)
        labels = torch.full_like(ids, IGNORE)
        for b, t in chosen:
            assert maskable[b, t], (b, t)
            labels[b, t] = ids[b, t]
        return ids.clone(), labels
    return mask_tokens


def test_loss_counts_only_the_masked_positions(mlm_model, monkeypatch):
    """With the input text fixed, the loss of positions {a, b} is the mean of the losses of
    {a} and of {b}: no other position contributes."""
    cfg, model = mlm_model
    inputs = mapped_inputs(cfg, model, "MLM", n=2, is_train=True)
    model.train()
    calls = []

    def loss(chosen):
        monkeypatch.setattr(masked_lm, "mask_tokens", _fixed_choice(chosen, calls))
        torch.manual_seed(0)  # the same dropout masks in every call
        with torch.no_grad():
            return model(inputs, task="MLM")["loss_mlm"].item()

    a, b = (0, 1), (0, 2)  # the first two words of the first text
    la, lb, lab = loss([a]), loss([b]), loss([a, b])
    assert len(calls) == 3, "the task no longer masks through masked_lm.mask_tokens"
    assert abs(la - lb) > 1e-4  # the two positions really differ
    assert lab == pytest.approx(0.5 * (la + lb), rel=1e-4, abs=1e-5)
    # other unmasked tokens (here: a word order change in the second text) do not count either
    words = inputs[1]["text"].split()
    assert words[0] != words[1]
    inputs[1] = dict(inputs[1], text=" ".join([words[1], words[0]] + words[2:]))
    assert loss([a]) == pytest.approx(la, rel=1e-4, abs=1e-5)


def test_eval_predicts_at_the_masked_positions_only(mlm_model):
    cfg, model = mlm_model
    inputs = mapped_inputs(cfg, model, "MLM", n=4)
    out = _eval(model, inputs)
    tok = model.text_encoder.tokenize([x["text"] for x in inputs])
    vocabulary = set(cfg.TASKS.MLM.VOCABULARY_IDS)
    assert len(out) == len(inputs)
    for i, o in enumerate(out):
        pred, labels = o["mlm_predictions"], o["mlm_labels"]
        ids = tok["input_ids"][i][tok["attention_mask"][i].bool()]  # the text's tokens, no padding
        assert pred.dtype == labels.dtype == torch.int64 and pred.shape == labels.shape == ids.shape
        masked = labels != IGNORE
        assert masked.any()  # every text gets at least one masked token
        assert torch.equal(pred != IGNORE, masked)
        assert not masked[0] and not masked[-1]  # never the [CLS] / [SEP] specials
        assert torch.equal(labels[masked], ids[masked])  # the labels are the original tokens
        assert set(pred[masked].tolist()) <= vocabulary


def test_eval_masking_is_reproducible_and_feeds_the_evaluator(mlm_model):
    cfg, model = mlm_model
    inputs = mapped_inputs(cfg, model, "MLM", n=4)
    first, again = _eval(model, inputs), _eval(model, inputs)
    for a, b in zip(first, again):
        assert torch.equal(a["mlm_labels"], b["mlm_labels"]) and torch.equal(a["mlm_predictions"], b["mlm_predictions"])
    ev = MaskedLMEvaluator(distributed=False)
    ev.reset()
    ev.process(inputs, first)
    res = ev.evaluate()["mlm"]
    correct = sum(int((o["mlm_predictions"] == o["mlm_labels"])[o["mlm_labels"] != IGNORE].sum()) for o in first)
    total = sum(int((o["mlm_labels"] != IGNORE).sum()) for o in first)
    assert res["accuracy"] == pytest.approx(100.0 * correct / total)
