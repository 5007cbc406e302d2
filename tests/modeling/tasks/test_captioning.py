"""Image captioning through the public API (``model(inputs, task="CAP", beam_size=..,
max_length=..)`` and ``CaptioningEvaluator``): a finite training loss; generated captions are
strings of at most MAX_CAPTION_LENGTH vocabulary tokens; greedy decoding (beam 1) is
deterministic and batch-independent, and so is beam search."""
import pytest
import torch

from task_models import mapped_inputs, tiny_model
from up2.evaluation import CaptioningEvaluator

MAX_LEN = 6


@pytest.fixture(scope="module")
def cap_model(shapes_datasets):
    return tiny_model({"CAP": ("captioning", {"VOCABULARY": "dataset", "MAX_CAPTION_LENGTH": MAX_LEN,
                                              "BEAM_SIZE": 2})})


def _generate(model, inputs, **kw):
    model.eval()
    with torch.no_grad():
        return model(inputs, task="CAP", **kw)


def test_training_loss_is_finite_and_trains_the_image_side(cap_model):
    cfg, model = cap_model
    torch.manual_seed(0)
    inputs = mapped_inputs(cfg, model, "CAP", n=3, is_train=True)
    model.train()
    losses = model(inputs, task="CAP")
    assert set(losses) == {"loss_caption"} and losses["loss_caption"].dim() == 0
    assert torch.isfinite(losses["loss_caption"]) and losses["loss_caption"] > 0
    losses["loss_caption"].backward()
    grads = [p.grad for p in model.image_encoder.parameters() if p.grad is not None]
    assert grads and sum(g.norm() for g in grads) > 1e-6
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_captions_are_short_strings_of_vocabulary_tokens(cap_model, beam_size):
    cfg, model = cap_model
    inputs = mapped_inputs(cfg, model, "CAP", n=3)
    out = _generate(model, inputs, beam_size=beam_size)
    vocabulary = set(cfg.TASKS.CAP.VOCABULARY_IDS)
    specials = {model.text_encoder.special_ids.cls, model.text_encoder.special_ids.sep,
                model.text_encoder.special_ids.pad}
    assert len(out) == len(inputs)
    for o in out:
        ids = o["caption_ids"]
        assert isinstance(o["caption"], str) and ids.dtype == torch.int64 and ids.dim() == 1
        assert len(ids) <= MAX_LEN
        assert set(ids.tolist()) <= vocabulary - specials
        assert (len(o["caption"].strip()) > 0) == (len(ids) > 0)


def test_max_length_bounds_the_caption(cap_model):
    cfg, model = cap_model
    inputs = mapped_inputs(cfg, model, "CAP", n=2)
    for max_length in (1, 2):
        assert all(len(o["caption_ids"]) <= max_length for o in _generate(model, inputs, max_length=max_length))


def test_greedy_is_deterministic_and_batch_independent(cap_model):
    cfg, model = cap_model
    inputs = mapped_inputs(cfg, model, "CAP", n=3)
    first = _generate(model, inputs, beam_size=1)
    again = _generate(model, inputs, beam_size=1)
    reversed_batch = _generate(model, inputs[::-1], beam_size=1)[::-1]
    for a, b, c in zip(first, again, reversed_batch):
        assert torch.equal(a["caption_ids"], b["caption_ids"]) and a["caption"] == b["caption"]
        assert torch.equal(a["caption_ids"], c["caption_ids"])


def test_beam_search_is_batch_independent(cap_model):
    cfg, model = cap_model
    inputs = mapped_inputs(cfg, model, "CAP", n=3)
    batch = _generate(model, inputs, beam_size=3)
    for x, b in zip(inputs, batch):
        assert torch.equal(_generate(model, [x], beam_size=3)[0]["caption_ids"], b["caption_ids"])


def test_evaluator_scores_the_generated_captions(cap_model):
    cfg, model = cap_model
    inputs = mapped_inputs(cfg, model, "CAP", n=3)
    out = _generate(model, inputs)
    ev = CaptioningEvaluator({x["image_id"]: x["captions"] for x in inputs}, distributed=False)
    ev.reset()
    ev.process(inputs, out)
    res = ev.evaluate()["captioning"]
    assert 0.0 <= res["BLEU-4"] <= 100.0 and 0.0 <= res["CIDEr"] <= 1000.0


def test_length_penalty_option(cap_model):
    """The option reaches the search: beam 1 ignores it (greedy), a bad value is a clear error."""
    cfg, model = cap_model
    inputs = mapped_inputs(cfg, model, "CAP", n=2)
    plain = _generate(model, inputs, beam_size=1, length_penalty=0.0)
    for a, b in zip(plain, _generate(model, inputs, beam_size=1, length_penalty=2.0)):
        assert torch.equal(a["caption_ids"], b["caption_ids"])
    assert len(_generate(model, inputs, beam_size=2, length_penalty=1.0)) == 2
    with pytest.raises(ValueError, match="length_penalty must be a finite float >= 0"):
        _generate(model, inputs, length_penalty=-1.0)
