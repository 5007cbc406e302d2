"""CaptioningEvaluator against pycocoevalcap's scorers called directly; result file; errors; the PTB
tokenizer (Java) when available, simple_tokenize otherwise, and the result naming which."""
import json
import logging
import os
import shutil

import pytest
from detectron2.data import MetadataCatalog
from detectron2.evaluation.testing import flatten_results_dict
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from up2.evaluation import CaptioningEvaluator, caption_scores, load_coco_captions, simple_tokenize, tokenize_captions

# Already lowercase and without punctuation, so simple_tokenize leaves them as they are.
GTS = {
    1: ["a cat sits on a red mat", "a small cat on a mat", "the cat is resting on the mat"],
    2: ["two dogs run in the park", "dogs playing on green grass", "a pair of dogs running outside"],
    3: ["a man rides a bike down the street", "a person on a bicycle in the city"],
    4: ["a plate of food with broccoli", "a meal on a white plate"],
}
RES = {1: "a cat on a mat", 2: "two dogs running in a park", 3: "a man riding a bicycle", 4: "a plate with food"}


def _run(ev, res, batch=3):
    ids = sorted(res)
    for s in range(0, len(ids), batch):
        ev.process([{"image_id": i} for i in ids[s : s + batch]], [{"caption": res[i]} for i in ids[s : s + batch]])
    return ev.evaluate()


def test_matches_pycocoevalcap_directly(tmp_path):
    res = _run(CaptioningEvaluator(GTS, output_dir=str(tmp_path)), RES)["captioning"]
    refs, hyps = {i: GTS[i] for i in RES}, {i: [RES[i]] for i in RES}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    cider, _ = Cider().compute_score(refs, hyps)
    for n in range(4):
        assert res[f"BLEU-{n + 1}"] == pytest.approx(100 * bleu[n])
    assert res["CIDEr"] == pytest.approx(100 * cider)
    assert 0 < res["BLEU-4"] < res["BLEU-1"] < 100 and res["CIDEr"] > 0
    # COCO results format, sorted, written atomically (no temp file left behind)
    with open(tmp_path / "captions_results.json") as f:
        assert json.load(f) == [{"image_id": i, "caption": RES[i]} for i in sorted(RES)]
    assert os.listdir(tmp_path) == ["captions_results.json"]


def test_identical_caption_gives_bleu4_100():
    gts = {1: ["a cat sits on a red mat"], 2: ["two dogs run in the park"]}
    res = _run(CaptioningEvaluator(gts), {1: "A cat sits on a red mat.", 2: "Two dogs run in the park!"})["captioning"]
    for n in range(1, 5):
        assert res[f"BLEU-{n}"] == pytest.approx(100.0, rel=1e-6)
    # CIDEr-D of a perfect match over two images: idf = log(2) on every n-gram, cosine 1 -> 10 per image (x100)
    assert res["CIDEr"] == pytest.approx(1000.0, rel=1e-6)


def test_simple_tokenize():
    assert simple_tokenize("A man's T-shirt,  red.") == "a man s t shirt red"
    assert simple_tokenize("  ") == ""


def test_from_json_and_dataset(tmp_path, caplog):
    data = {
        "images": [{"id": i} for i in (1, 2, 3, 4, 5)],
        "annotations": [
            {"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate((i, c) for i in GTS for c in GTS[i])
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    assert load_coco_captions(str(path)) == {**GTS, 5: []}
    MetadataCatalog.get("test_up2_captions_eval").set(captions_file=str(path))
    ev = CaptioningEvaluator.from_dataset("test_up2_captions_eval")
    part = {i: RES[i] for i in (1, 2)}
    with caplog.at_level(logging.WARNING, logger="up2.evaluation.captioning"):
        res = _run(ev, part)
    assert "2 ground-truth image(s) have no prediction" in caplog.text
    assert res == _run(CaptioningEvaluator({i: GTS[i] for i in (1, 2)}), part)


def test_empty_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="up2.evaluation.captioning"):
        assert CaptioningEvaluator(GTS).evaluate() == {}
    assert "did not receive any prediction" in caplog.text


def test_bad_input(tmp_path):
    ev = CaptioningEvaluator(GTS)
    with pytest.raises(ValueError, match="'caption'"):
        ev.process([{"image_id": 1}], [{"caption": ["a", "b"]}])
    with pytest.raises(ValueError, match="image_id"):
        ev.process([{}], [{"caption": "a cat"}])
    ev.process([{"image_id": 99}], [{"caption": "a cat"}])
    with pytest.raises(ValueError, match=r"image_id\(s\) \[99\]"):
        ev.evaluate()
    with pytest.raises(ValueError, match=r"ground_truth\[1\]"):
        CaptioningEvaluator({1: "a cat"})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="'annotations' list"):
        CaptioningEvaluator(str(bad))
    with pytest.raises(ValueError, match="captions_file"):
        CaptioningEvaluator.from_dataset("test_up2_no_captions")


# ---- tokenizer: coco-caption's PTB (Java) when available, else simple_tokenize; the result names it

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH (PTB tokenizer)")


def _results_are_detectron2_floats(res):
    """EvalHook stores every flattened result as a float; the writers need strict JSON."""
    assert all(isinstance(v, float) for v in flatten_results_dict(res).values())
    json.dumps(res, allow_nan=False)


def _evaluate_and_check_tokenizer(caplog, name: str, flag: float, logged: str):
    """The default evaluator on GTS/RES used tokenizer ``name``, says so in its results
    (``ptb_tokenizer`` = ``flag``) and its log (``logged``), and its results are strict floats."""
    ev = CaptioningEvaluator(GTS)
    with caplog.at_level(logging.INFO, logger="up2.evaluation.captioning"):
        res = _run(ev, RES)
    assert res["captioning"]["ptb_tokenizer"] == flag and ev.tokenizer_used == name
    assert logged in caplog.text
    _results_are_detectron2_floats(res)


@needs_java
def test_ptb_tokenizer_is_used_and_named_when_java_is_there(caplog):
    assert tokenize_captions({1: ["A man's T-shirt, red."]}) == ({1: ["a man 's t-shirt red"]}, "ptb")
    _evaluate_and_check_tokenizer(caplog, "ptb", 1.0, "PTB tokenizer")


def test_without_java_simple_tokenize_is_used_and_named(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java
    assert tokenize_captions({1: ["A man's T-shirt, red."]}) == ({1: ["a man s t shirt red"]}, "simple")
    _evaluate_and_check_tokenizer(caplog, "simple", 0.0, "simple_tokenize")
    with pytest.raises(RuntimeError, match="no 'java' is on PATH"):
        CaptioningEvaluator(GTS, tokenizer="ptb")
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        CaptioningEvaluator(GTS, tokenizer="PTB")


def test_a_failed_ptb_run_falls_back_with_a_warning(monkeypatch, caplog):
    import up2.evaluation.captioning as captioning

    def broken(captions):
        raise PermissionError("read-only jar folder")

    monkeypatch.setattr(captioning.shutil, "which", lambda name: "/opt/java/bin/java")
    monkeypatch.setattr(captioning, "_ptb_tokenize", broken)
    with caplog.at_level(logging.WARNING, logger="up2.evaluation.captioning"):
        assert tokenize_captions({1: ["A cat."]}) == ({1: ["a cat"]}, "simple")
    assert "PTB tokenizer failed (PermissionError: read-only jar folder)" in caplog.text
    with pytest.raises(PermissionError):  # asked for explicitly: no fallback
        tokenize_captions({1: ["A cat."]}, "ptb")


@needs_java
def test_punctuation_and_case_score_as_the_normalised_caption_under_ptb():
    gts = {1: ["A man's T-shirt is red.", "a man in a red shirt"], 2: ["Two dogs -- running!", "dogs run in a park"]}
    raw = {1: "A man's T-shirt, red!", 2: "Two dogs, running in the park."}
    normalised = {1: "a man 's t-shirt red", 2: "two dogs running in the park"}
    a = caption_scores(gts, raw, tokenizer="ptb")
    b = caption_scores(gts, normalised, tokenizer="ptb")
    assert a["ptb_tokenizer"] == b["ptb_tokenizer"] == 1.0
    assert a == pytest.approx(b, rel=1e-9) and a["BLEU-1"] > 50
