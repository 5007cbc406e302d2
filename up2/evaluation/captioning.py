"""BLEU-1..4 and CIDEr of generated captions (paper §5.1 evaluation, Tab. 2 / Tab. 6: COCO Caption
B@4 and CIDEr), scored with pycocoevalcap's ``Bleu(4)`` and ``Cider`` (CIDEr-D) scorers.

Format consumed by :meth:`CaptioningEvaluator.process` (one pair per image):
    input  ``"image_id"``: the image's id in the ground truth (int for COCO).
    output ``"caption"``: str, the generated caption.

Tokenisation (``tokenizer=``):
    "ptb": coco-caption's protocol, pycocoevalcap's ``PTBTokenizer`` (Stanford PTBTokenizer, a
        Java program: lowercase, PTB tokens, punctuation tokens removed: "A man's T-shirt." ->
        "a man 's t-shirt"). Needs ``java`` on PATH.
    "simple": :func:`simple_tokenize` (pure Python): lowercase, every character that is not a
        letter, digit, underscore or whitespace becomes a space ("a man s t shirt"); it differs
        from PTB on contractions and hyphens, so its scores are close to, not equal to, the
        official toolkit's.
    "auto" (default): "ptb" when ``java`` is on PATH, else "simple"; a PTB run that fails (e.g. the
        jar's folder is read-only) falls back to "simple" with a warning.
The tokenizer used is logged with the scores and reported in the results as the non-metric field
``"ptb_tokenizer"`` (1.0 = PTB, 0.0 = simple: detectron2 results are nested dicts of floats).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from up2.utils.atomic import write_json_atomic

__all__ = ["CaptioningEvaluator", "simple_tokenize", "load_coco_captions", "caption_scores", "tokenize_captions",
           "TOKENIZERS"]

logger = logging.getLogger(__name__)

_NON_WORD = re.compile(r"[^\w\s]")

RESULTS_FILE = "captions_results.json"  # written under output_dir, COCO results format
TOKENIZERS = ("auto", "ptb", "simple")
TOKENIZER_FIELD = "ptb_tokenizer"  # results: 1.0 = PTB tokenizer, 0.0 = simple_tokenize (not a metric)


def simple_tokenize(text: str) -> str:
    """Lowercase, replace punctuation by spaces, re-join the whitespace-split words with one space.

    Example: ``"A man's T-shirt, red."`` -> ``"a man s t shirt red"``.
    """
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def load_coco_captions(json_file: str) -> Dict[Hashable, List[str]]:
    """Ground-truth captions of a COCO captions json (``annotations``: [{"image_id", "caption"}]).

    Returns:
        image_id -> list of captions; images listed in ``images`` without annotation map to [].

    Raises:
        ValueError: the file is not a COCO captions json (names the file and the missing key).
    """
    with PathManager.open(json_file, "r") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{json_file}: expected a COCO captions json with an 'annotations' list")
    gts: Dict[Hashable, List[str]] = {img["id"]: [] for img in data.get("images", []) if "id" in img}
    for k, ann in enumerate(data["annotations"]):
        if "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise ValueError(
                f"{json_file}: annotation {k} needs 'image_id' and a str 'caption', got keys {sorted(ann)}"
            )
        gts.setdefault(ann["image_id"], []).append(ann["caption"])
    return gts


def _scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:
        raise ImportError("CaptioningEvaluator needs pycocoevalcap: pip install pycocoevalcap") from e
    return Bleu, Cider


def _check_tokenizer(tokenizer: str) -> str:
    """``tokenizer`` checked (one of :data:`TOKENIZERS`); "ptb" needs java on PATH.

    Raises:
        ValueError: an unknown name. RuntimeError: "ptb" without java on PATH.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "ptb" and shutil.which("java") is None:
        raise RuntimeError("tokenizer='ptb' runs pycocoevalcap's PTBTokenizer, a Java program, but no 'java' is on "
                           "PATH: install a Java runtime, or use tokenizer='simple' (or 'auto')")
    return tokenizer


def _ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> Dict[Hashable, List[str]]:
    """pycocoevalcap's PTBTokenizer on every caption in one Java run, its output checked.

    Raises:
        RuntimeError: the tokenizer's output does not hold one line per caption.
        OSError: Java or the jar's temporary file could not be run / written.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # one line per caption: any line break or other whitespace run becomes one space
    inputs = {k: [{"caption": " ".join(c.split())} for c in caps] for k, caps in captions.items() if caps}
    out = PTBTokenizer().tokenize(inputs)
    bad = [k for k, caps in inputs.items() if len(out.get(k, ())) != len(caps)]
    if bad or len(out) != len(inputs):
        raise RuntimeError(f"PTBTokenizer (java) returned {sum(map(len, out.values()))} lines for "
                           f"{sum(map(len, inputs.values()))} captions")
    return {k: list(out.get(k, [])) for k in captions}


def tokenize_captions(captions: Mapping[Hashable, Sequence[str]],
                      tokenizer: str = "auto") -> Tuple[Dict[Hashable, List[str]], str]:
    """Tokenise captions for the scorers (module docstring: "ptb", "simple", "auto").

    Args:
        captions: key -> list of str captions.
        tokenizer: "auto", "ptb" or "simple".

    Returns:
        (key -> list of tokenised captions (space-separated tokens), the tokenizer used: "ptb" or
        "simple").

    Raises:
        ValueError: an unknown tokenizer. RuntimeError / OSError: "ptb" without java, or a PTB run
            that failed (with "auto" that falls back to "simple" with a warning instead).
    """
    tokenizer = _check_tokenizer(tokenizer)
    if tokenizer == "auto":
        tokenizer = "ptb" if shutil.which("java") is not None else "simple"
        if tokenizer == "ptb":
            try:
                return _ptb_tokenize(captions), "ptb"
            except (OSError, RuntimeError) as e:
                logger.warning(f"PTB tokenizer failed ({type(e).__name__}: {e}); captions are tokenised with "
                               "simple_tokenize instead (scores close to, not equal to, coco-caption's)")
                tokenizer = "simple"
    if tokenizer == "ptb":
        return _ptb_tokenize(captions), "ptb"
    return {k: [simple_tokenize(c) for c in caps] for k, caps in captions.items()}, "simple"


def caption_scores(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, str],
                   tokenizer: str = "auto") -> Dict[str, float]:
    """BLEU-1..4 (corpus level, "closest" reference length) and CIDEr-D, all x100.

    References and generated captions are tokenised together (:func:`tokenize_captions`; one Java
    run for PTB); CIDEr's document frequencies come from the references of the scored images (as
    in coco-caption).

    Args:
        gts: image_id -> reference captions (>= 1 each), for every id of ``res``.
        res: image_id -> generated caption.
        tokenizer: "auto" (PTB when java is on PATH, else simple), "ptb" or "simple".

    Returns:
        ``{"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"}`` -> float (x100), plus the non-metric
        ``"ptb_tokenizer"``: 1.0 when the PTB tokenizer was used, 0.0 for simple_tokenize.

    Raises:
        ValueError: empty ``res``, an id of ``res`` without references in ``gts``, an unknown
            tokenizer. RuntimeError: tokenizer "ptb" without java.
    """
    if not res:
        raise ValueError("no caption to score")
    missing = [i for i in res if not gts.get(i)]
    if missing:
        raise ValueError(f"no reference caption for image_id(s) {missing[:5]} ({len(missing)} in all)")
    Bleu, Cider = _scorers()
    ids = sorted(res)
    both = {**{("gt", i): list(gts[i]) for i in ids}, **{("res", i): [res[i]] for i in ids}}
    tokenized, used = tokenize_captions(both, tokenizer)
    refs = {i: tokenized[("gt", i)] for i in ids}
    hyps = {i: tokenized[("res", i)] for i in ids}
    with contextlib.redirect_stdout(io.StringIO()):  # the BLEU scorer prints its n-gram counts
        bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    cider, _ = Cider().compute_score(refs, hyps)
    out = {f"BLEU-{n + 1}": 100.0 * float(b) for n, b in enumerate(bleu)}
    out["CIDEr"] = 100.0 * float(cider)
    out[TOKENIZER_FIELD] = 1.0 if used == "ptb" else 0.0
    return out


class CaptioningEvaluator(DatasetEvaluator):
    """BLEU-1..4 and CIDEr (x100) of one generated caption per image, gathered over all ranks.

    Only predicted images are scored (a partial run scores its subset, with a warning); when an
    image id appears twice the first caption received (rank 0 first) is kept.

    Results (main process): ``{"captioning": {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr",
    "ptb_tokenizer"}}``, floats; "ptb_tokenizer" is not a metric but the tokenizer used (1.0 = PTB,
    0.0 = simple; also logged, and kept as :attr:`tokenizer_used`, "ptb" / "simple").
    With ``output_dir`` the predictions are also written to ``output_dir/captions_results.json`` as
    COCO results (``[{"image_id", "caption"}]``, sorted by image_id) via a temp file + rename.
    Other ranks return ``{}``; an evaluator that saw no image warns and returns ``{}``.
    """

    def __init__(
        self,
        ground_truth: Union[str, Mapping[Hashable, Sequence[str]]],
        output_dir: Optional[str] = None,
        distributed: bool = True,
        task_key: str = "captioning",
        tokenizer: str = "auto",
    ):
        """
        Args:
            ground_truth: path of a COCO captions json, or a mapping image_id -> reference captions.
            output_dir: where to write the predictions (None: not written).
            distributed: gather from all ranks (detectron2 ``comm``); False evaluates this rank only.
            task_key: the key of the result dict.
            tokenizer: "auto" (coco-caption's PTB tokenizer when java is on PATH, else
                :func:`simple_tokenize`), "ptb" or "simple" (module docstring).

        Raises:
            ImportError: pycocoevalcap is not installed.
            ValueError: a malformed captions json or mapping, an unknown tokenizer.
            RuntimeError: tokenizer "ptb" without java on PATH.
        """
        _scorers()
        self._tokenizer = _check_tokenizer(tokenizer)
        self.tokenizer_used: Optional[str] = None  # "ptb" / "simple" after evaluate()
        if isinstance(ground_truth, (str, os.PathLike)):
            self._gts = load_coco_captions(os.fspath(ground_truth))
        elif isinstance(ground_truth, Mapping):
            self._gts = {}
            for k, caps in ground_truth.items():
                if isinstance(caps, str) or not all(isinstance(c, str) for c in caps):
                    raise ValueError(f"ground_truth[{k!r}] must be a list of str captions, got {caps!r:.80}")
                self._gts[k] = list(caps)
        else:
            raise ValueError(
                f"ground_truth must be a json path or a mapping image_id -> captions, got {type(ground_truth)}"
            )
        self._output_dir = output_dir
        self._distributed = distributed
        self._task_key = task_key
        self.reset()

    @classmethod
    def from_dataset(cls, dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True,
                     tokenizer: str = "auto"):
        """Build from ``MetadataCatalog.get(dataset_name).captions_file`` (a COCO captions json).

        Raises:
            ValueError: the dataset's metadata has no ``captions_file``.
        """
        from detectron2.data import MetadataCatalog

        path = getattr(MetadataCatalog.get(dataset_name), "captions_file", None)
        if not path:
            raise ValueError(f"dataset {dataset_name!r} has no 'captions_file' in its metadata")
        return cls(path, output_dir=output_dir, distributed=distributed, tokenizer=tokenizer)

    def reset(self):
        self._predictions: List[dict] = []

    def process(self, inputs, outputs):
        """Store ``{"image_id", "caption"}`` of each image.

        Args:
            inputs: B dicts with ``"image_id"``.
            outputs: B dicts with ``"caption"`` (str).

        Raises:
            ValueError: a missing field or a caption that is not a str (names the field).
        """
        if len(inputs) != len(outputs):
            raise ValueError(f"got {len(inputs)} inputs but {len(outputs)} outputs")
        for i, (inp, out) in enumerate(zip(inputs, outputs)):
            if "image_id" not in inp:
                raise ValueError(f"input {i} has no 'image_id'; keys: {sorted(inp)}")
            if not isinstance(out.get("caption"), str):
                raise ValueError(
                    f"output {i} (image_id {inp['image_id']!r}) needs a str 'caption', got {out.get('caption')!r:.80}"
                )
            self._predictions.append({"image_id": inp["image_id"], "caption": out["caption"]})

    def _write(self, predictions: List[dict]):
        path = os.path.join(self._output_dir, RESULTS_FILE)
        write_json_atomic(predictions, path, indent=None)  # strict JSON, normal file mode
        logger.info(f"Saved {len(predictions)} captions to {path}")

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        predictions = self._predictions
        if self._distributed:
            comm.synchronize()
            predictions = [p for part in comm.gather(predictions, dst=0) for p in part]
            if not comm.is_main_process():
                return {}
        if not predictions:
            logger.warning("[CaptioningEvaluator] did not receive any prediction; returning no result")
            return {}
        res: Dict[Hashable, str] = {}
        for p in predictions:
            res.setdefault(p["image_id"], p["caption"])
        if len(res) < len(predictions):
            n_rep = len(predictions) - len(res)
            logger.warning(f"[CaptioningEvaluator] {n_rep} repeated image_id(s): kept the first caption")
        predictions = [{"image_id": i, "caption": res[i]} for i in sorted(res)]
        if self._output_dir:
            self._write(predictions)
        unscored = sum(1 for i, caps in self._gts.items() if caps and i not in res)
        if unscored:
            logger.warning(
                f"[CaptioningEvaluator] {unscored} ground-truth image(s) have no prediction; scoring {len(res)} images"
            )
        scores = caption_scores(self._gts, res, self._tokenizer)
        self.tokenizer_used = "ptb" if scores[TOKENIZER_FIELD] else "simple"
        name = "coco-caption's PTB tokenizer" if self.tokenizer_used == "ptb" else "simple_tokenize (no Java PTB)"
        logger.info(f"Captioning scores (x100) over {len(res)} images, tokenised with {name}:\n"
                    + create_small_table({k: v for k, v in scores.items() if k != TOKENIZER_FIELD}))
        return {self._task_key: scores}
