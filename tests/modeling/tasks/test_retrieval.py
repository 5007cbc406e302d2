"""Image-text retrieval through the public API (``model(inputs, task="RET")`` and
``RetrievalEvaluator``): the contrastive loss reaches the text encoder and, after a few steps,
prefers the true image-caption pairs to shuffled ones; eval embeddings feed the evaluator."""
import copy

import pytest
import torch

from task_models import mapped_inputs, tiny_model
from up2.evaluation import RetrievalEvaluator


@pytest.fixture(scope="module")
def ret_model(shapes_datasets):
    return tiny_model({"RET": ("retrieval", {})})


def _train_inputs(cfg, model, n=4):
    torch.manual_seed(0)
    inputs = mapped_inputs(cfg, model, "RET", n=n, is_train=True)
    for x in inputs:  # a fixed caption per image (the mapper may draw one of them)
        x["caption"] = x["captions"][0]
    return inputs


def _loss(model, inputs):
    torch.manual_seed(0)  # the same dropout masks for every call
    return model(inputs, task="RET")["loss_retrieval"]


def test_loss_is_finite_and_reaches_the_text_encoder(ret_model):
    cfg, model = ret_model
    model.train()
    loss = _loss(model, _train_inputs(cfg, model))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    text_grads = [p.grad for p in model.text_encoder.parameters() if p.grad is not None]
    image_grads = [p.grad for p in model.image_encoder.parameters() if p.grad is not None]
    assert text_grads and sum(g.norm() for g in text_grads) > 1e-6
    assert image_grads and sum(g.norm() for g in image_grads) > 1e-6
    model.zero_grad(set_to_none=True)


def test_after_a_few_steps_true_pairs_score_better_than_shuffled(ret_model):
    cfg, model = ret_model
    model = copy.deepcopy(model).train()
    inputs = _train_inputs(cfg, model)
    shuffled = [dict(x, caption=inputs[(i + 1) % len(inputs)]["caption"]) for i, x in enumerate(inputs)]
    assert len({x["caption"] for x in inputs}) == len(inputs)  # the roll really mismatches every pair
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        _loss(model, inputs).backward()
        opt.step()
    with torch.no_grad():
        matched, mismatched = _loss(model, inputs).item(), _loss(model, shuffled).item()
    assert matched < mismatched - 0.1, (matched, mismatched)


def test_eval_embeddings_feed_the_evaluator(ret_model):
    cfg, model = ret_model
    inputs = mapped_inputs(cfg, model, "RET", n=4)
    model.eval()
    with torch.no_grad():
        out = model(inputs, task="RET")
    assert len(out) == len(inputs)
    d = out[0]["image_embedding"].shape[0]
    for x, o in zip(inputs, out):
        img, txt = o["image_embedding"], o["text_embeddings"]
        assert img.shape == (d,) and txt.shape == (len(x["captions"]), d)
        assert img.dtype == txt.dtype == torch.float32 and torch.isfinite(img).all() and torch.isfinite(txt).all()
        assert img.norm() > 0 and (txt.norm(dim=1) > 0).all()  # cosine similarity is defined
    ev = RetrievalEvaluator(ks=(1, 4), distributed=False)
    ev.reset()
    ev.process(inputs, out)
    res = ev.evaluate()["retrieval"]
    assert all(0.0 <= res[k] <= 100.0 for k in ("i2t_R@1", "t2i_R@1"))
    assert res["t2i_R@4"] == pytest.approx(100.0)  # 4 images: every caption finds its image in the top 4


def test_eval_embeddings_do_not_depend_on_the_batch(ret_model):
    cfg, model = ret_model
    inputs = mapped_inputs(cfg, model, "RET", n=3)
    model.eval()
    with torch.no_grad():
        batch = model(inputs, task="RET")
        single = model(inputs[1:2], task="RET")[0]
    torch.testing.assert_close(batch[1]["image_embedding"], single["image_embedding"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch[1]["text_embeddings"], single["text_embeddings"], rtol=1e-4, atol=1e-5)
