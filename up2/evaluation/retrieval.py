"""Image-text retrieval recall R@k in both directions (paper §5.1 evaluation, Tab. 2 / Tab. 6:
COCO Caption and Flickr30k, I2T and T2I R@1).

Shape shorthand:
    n  images in the test set      m  captions in the test set (sum of n_i, typically 5 n)
    n_i  ground-truth captions of image i      d  embedding width

Format consumed by :meth:`RetrievalEvaluator.process` (one pair per image):
    input  ``"image_id"``: hashable and sortable (int for COCO / Flickr30k), unique per image.
    output ``"image_embedding"``: (d,) float tensor, the image's retrieval feature.
    output ``"text_embeddings"``: (n_i, d) float tensor, the features of the image's n_i >= 1
        ground-truth captions (the model encodes them separately from the image).

Similarity is the cosine of the two embeddings over the WHOLE test set (n x m). Ties are counted
against the model: a query's rank is the number of wrong candidates scored >= its best right one.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table

__all__ = ["RetrievalEvaluator", "retrieval_recalls", "normalize_caption"]

logger = logging.getLogger(__name__)


def normalize_caption(caption: str) -> str:
    """The form in which two captions count as the same text: lower case, runs of white space as
    one space, no leading or trailing space."""
    return " ".join(str(caption).lower().split())


def retrieval_recalls(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    text_groups: Optional[torch.Tensor] = None,
) -> Dict[str, float]:
    """Image->text and text->image recall at k, in percent, over cosine similarities.

    Image->text: image i is a hit at k when ANY of its captions is among the k most similar
    captions. Text->image: caption j is a hit at k when its image is among the k most similar
    images. Vectorised over queries; only ``chunk_size`` rows of the (n, m) similarity matrix
    exist at a time.

    With ``text_groups`` (captions of equal id are the same text), a caption is right for every
    image that has a caption of its group: image->text counts a caption identical to one of the
    image's own as right, text->image counts every image carrying the query's text as right.

    Args:
        image_emb: (n, d) float, one row per image (need not be normalised).
        text_emb: (m, d) float, one row per caption.
        text_to_image: (m,) int64, the row of ``image_emb`` each caption belongs to.
        ks: the k of the reported recalls.
        chunk_size: query rows scored at once (memory ~ chunk_size * max(n, m) floats).
        text_groups: optional (m,) int64, an id per caption text (equal ids = identical texts);
            needs an (n, number of texts) bool table in memory.

    Returns:
        ``{"i2t_R@k": float, ..., "t2i_R@k": float, ...}`` in percent.

    Raises:
        ValueError: mismatched shapes / widths, no image, an image without caption, an index
            out of range, or a NaN / inf embedding.
    """
    if image_emb.dim() != 2 or text_emb.dim() != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"image_emb must be (n, d) and text_emb (m, d) with the same d, got {tuple(image_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )
    n, m = image_emb.shape[0], text_emb.shape[0]
    if text_to_image.shape != (m,):
        raise ValueError(f"text_to_image must have shape ({m},) like text_emb's rows, got {tuple(text_to_image.shape)}")
    if m and (text_to_image.min() < 0 or text_to_image.max() >= n):
        raise ValueError(f"text_to_image must index images in [0, {n}), got values in "
                         f"[{text_to_image.min().item()}, {text_to_image.max().item()}]")
    if n == 0:
        raise ValueError("image_emb has no row: nothing to retrieve")
    if torch.bincount(text_to_image, minlength=n).min() == 0:
        raise ValueError("every image needs at least one caption in text_to_image")
    for name, t in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")
    if text_groups is not None and text_groups.shape != (m,):
        raise ValueError(f"text_groups must have shape ({m},) like text_emb's rows, got {tuple(text_groups.shape)}")
    img = F.normalize(image_emb.float(), dim=1)
    txt = F.normalize(text_emb.float(), dim=1)
    owner = text_to_image.to(img.device)
    if text_groups is not None:
        return _recalls_by_text(img, txt, owner, torch.unique(text_groups, return_inverse=True)[1].to(img.device),
                                ks, chunk_size)

    i2t_rank = torch.empty(n, dtype=torch.int64, device=img.device)
    for s in range(0, n, chunk_size):
        sim = img[s : s + chunk_size] @ txt.T  # (c, m)
        rows = torch.arange(s, s + sim.shape[0], device=img.device)
        own = owner[None, :] == rows[:, None]  # (c, m) True on the image's own captions
        best_pos = sim.masked_fill(~own, float("-inf")).amax(1, keepdim=True)  # (c, 1)
        i2t_rank[s : s + sim.shape[0]] = ((sim >= best_pos) & ~own).sum(1)

    t2i_rank = torch.empty(m, dtype=torch.int64, device=img.device)
    for s in range(0, m, chunk_size):
        sim = txt[s : s + chunk_size] @ img.T  # (c, n)
        pos_idx = owner[s : s + chunk_size, None]  # (c, 1)
        pos = sim.gather(1, pos_idx)
        t2i_rank[s : s + sim.shape[0]] = (sim >= pos).sum(1) - 1  # minus the right image itself

    res = {f"i2t_R@{k}": 100.0 * (i2t_rank < k).double().mean().item() for k in ks}
    res.update({f"t2i_R@{k}": 100.0 * (t2i_rank < k).double().mean().item() for k in ks})
    return res


def _recalls_by_text(img, txt, owner, group, ks, chunk_size) -> Dict[str, float]:
    """``retrieval_recalls`` where every image carrying a caption's text is right for it.
    img (n, d) and txt (m, d) normalised; owner (m,) image of each caption; group (m,) text id
    in [0, U)."""
    n, m = img.shape[0], txt.shape[0]
    has = torch.zeros(n, int(group.max()) + 1, dtype=torch.bool, device=img.device)  # (n, U)
    has[owner, group] = True
    i2t_rank = torch.empty(n, dtype=torch.int64, device=img.device)
    for s in range(0, n, chunk_size):
        sim = img[s : s + chunk_size] @ txt.T  # (c, m)
        right = has[s : s + sim.shape[0]][:, group]  # (c, m), the image's own captions included
        # the best right caption: one of another image with an own caption's text counts too
        best = sim.masked_fill(~right, float("-inf")).amax(1, keepdim=True)
        i2t_rank[s : s + sim.shape[0]] = ((sim >= best) & ~right).sum(1)
    t2i_rank = torch.empty(m, dtype=torch.int64, device=img.device)
    for s in range(0, m, chunk_size):
        sim = txt[s : s + chunk_size] @ img.T  # (c, n)
        right = has[:, group[s : s + chunk_size]].T  # (c, n)
        best = sim.masked_fill(~right, float("-inf")).amax(1, keepdim=True)
        t2i_rank[s : s + sim.shape[0]] = ((sim >= best) & ~right).sum(1)
    res = {f"i2t_R@{k}": 100.0 * (i2t_rank < k).double().mean().item() for k in ks}
    res.update({f"t2i_R@{k}": 100.0 * (t2i_rank < k).double().mean().item() for k in ks})
    return res


class RetrievalEvaluator(DatasetEvaluator):
    """R@k image->text and text->image over a whole test set, gathered over all ranks.

    Embeddings are kept on the CPU in float32 (so bf16 outputs are fine); ``evaluate`` orders
    images by ``image_id`` (the result does not depend on the number of ranks) and drops
    repeated image ids with a warning.

    Results (main process): ``{"retrieval": {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1",
    "t2i_R@5", "t2i_R@10"}}`` in percent. Other ranks return ``{}``; an evaluator that saw no
    image warns and returns ``{}``.

    ``match_identical_captions``: the inputs' ``"captions"`` (list of str) are kept, and a
    caption counts as right for every image that has a caption of the same text (compared
    case- and space-insensitively); the strict numbers are reported too, as ``strict_i2t_R@k``
    and ``strict_t2i_R@k``. For caption sets with templated repeats (shapes), where the strict
    protocol scores "two shapes on a gray background" as wrong for all but one of the images it
    describes; the paper's COCO / Flickr30k numbers use the strict protocol (the default).
    """

    def __init__(
        self,
        ks: Sequence[int] = (1, 5, 10),
        distributed: bool = True,
        chunk_size: int = 1024,
        device: Optional[torch.device] = None,
        task_key: str = "retrieval",
        match_identical_captions: bool = False,
    ):
        """
        Args:
            ks: the k of the reported recalls, each >= 1.
            distributed: gather from all ranks (detectron2 ``comm``); False evaluates this rank only.
            chunk_size: query rows of the similarity matrix scored at once.
            device: where the similarity matrix is computed (default CPU).
            task_key: the key of the result dict.
            match_identical_captions: identical caption texts are interchangeable (class docstring).

        Raises:
            ValueError: an empty ``ks``, a k < 1 or chunk_size < 1.
        """
        ks = tuple(int(k) for k in ks)
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be a non-empty sequence of ints >= 1, got {ks}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self._ks = ks
        self._distributed = distributed
        self._chunk_size = int(chunk_size)
        self._device = torch.device("cpu") if device is None else torch.device(device)
        self._task_key = task_key
        self._match_identical = bool(match_identical_captions)
        self.reset()

    def reset(self):
        self._records: List[tuple] = []  # (image_id, (d,) image emb, (n_i, d) caption embs, caption texts)

    def process(self, inputs, outputs):
        """Store the embeddings of each image and of its captions.

        Args:
            inputs: B dicts with ``"image_id"``.
            outputs: B dicts with ``"image_embedding"`` ((d,) float) and ``"text_embeddings"``
                ((n_i, d) float, n_i >= 1).

        Raises:
            ValueError: a missing field, or an embedding of the wrong shape (names the field).
        """
        if len(inputs) != len(outputs):
            raise ValueError(f"got {len(inputs)} inputs but {len(outputs)} outputs")
        for i, (inp, out) in enumerate(zip(inputs, outputs)):
            for key, where in (("image_id", inp), ("image_embedding", out), ("text_embeddings", out)):
                if key not in where:
                    side = "input" if where is inp else "output"
                    raise ValueError(f"{side} {i} has no {key!r}; keys: {sorted(where)}")
            img = torch.as_tensor(out["image_embedding"]).detach()
            txt = torch.as_tensor(out["text_embeddings"]).detach()
            if img.dim() != 1 or img.numel() == 0:
                raise ValueError(
                    f"'image_embedding' of image {inp['image_id']!r} must have shape (d,), got {tuple(img.shape)}"
                )
            if txt.dim() != 2 or txt.shape[0] == 0 or txt.shape[1] != img.shape[0]:
                raise ValueError(
                    f"'text_embeddings' of image {inp['image_id']!r} must have shape (n_i >= 1, d={img.shape[0]}) "
                    f"like 'image_embedding', got {tuple(txt.shape)}"
                )
            texts = ()
            if self._match_identical:
                texts = tuple(normalize_caption(c) for c in inp.get("captions", ()))
                if len(texts) != txt.shape[0]:
                    raise ValueError(
                        f"input {i} (image {inp['image_id']!r}): match_identical_captions needs its 'captions' "
                        f"(one per text embedding, {txt.shape[0]}), got {len(texts)}")
            self._records.append((inp["image_id"], img.float().cpu(), txt.float().cpu(), texts))

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        records = self._records
        if self._distributed:
            comm.synchronize()
            records = [r for part in comm.gather(records, dst=0) for r in part]
            if not comm.is_main_process():
                return {}
        if not records:
            logger.warning("[RetrievalEvaluator] did not receive any prediction; returning no result")
            return {}
        by_id = {}
        for rec in sorted(records, key=lambda r: r[0]):
            by_id.setdefault(rec[0], rec)
        if len(by_id) < len(records):
            logger.warning(f"[RetrievalEvaluator] {len(records) - len(by_id)} repeated image_id(s) dropped")
        records = list(by_id.values())
        widths = {r[1].numel() for r in records}
        if len(widths) > 1:
            raise ValueError(f"'image_embedding' widths differ across images: {sorted(widths)}")
        image_emb = torch.stack([r[1] for r in records]).to(self._device)  # (n, d)
        text_emb = torch.cat([r[2] for r in records]).to(self._device)  # (m, d)
        counts = torch.tensor([r[2].shape[0] for r in records])
        owner = torch.repeat_interleave(torch.arange(len(records)), counts).to(self._device)  # (m,)
        res = retrieval_recalls(image_emb, text_emb, owner, self._ks, self._chunk_size)
        if self._match_identical:
            ids: Dict[str, int] = {}
            groups = torch.tensor([ids.setdefault(t, len(ids)) for r in records for t in r[3]])
            strict = {f"strict_{k}": v for k, v in res.items()}
            res = retrieval_recalls(image_emb, text_emb, owner, self._ks, self._chunk_size, text_groups=groups)
            res.update(strict)
        logger.info(
            f"Retrieval recall (%) over {image_emb.shape[0]} images and {text_emb.shape[0]} captions:\n"
            + create_small_table(res)
        )
        return {self._task_key: res}
