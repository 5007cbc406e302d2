"""Object detection and instance segmentation in the unified formulation (paper §4.3,
"Tasks with Localization").

Shape shorthand: N images, Q proposals, R regional tokens, C classes, d width, K ground-truth
instances of one image, Hm x Wm mask logits (stride 4), Hp x Wp the padded input size.

Each regional token's output from g is compared with the class-name embeddings (Eq. 5-6);
proposals matched to a ground-truth object by the proposal network's matcher get the class
cross-entropy of Eq. 7. At inference, score = P(foreground) x P(class); boxes and masks are
the proposals' own.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils import comm
from torchvision.ops import box_convert

from up2.data.mappers import DetectionDatasetMapper
from up2.layers.paste_masks import paste_masks
from up2.modeling.image_encoder import REGIONAL_SEGMENT, gather_proposals
from up2.modeling.tasks.base import register_task
from up2.modeling.tasks.task import Task, TaskFamily, TaskInputs
from up2.modeling.token_attributes import Modality, input_modalities
from up2.structures import ProposalTargets

__all__ = ["DetectionTask", "InstanceSegmentationTask", "instances_to_targets"]


def instances_to_targets(batched_inputs: Sequence[dict], images: ImageList, with_masks: bool) -> List[ProposalTargets]:
    """Ground truth in the proposal network's convention.

    Args:
        batched_inputs: mapper dicts; each needs "instances" with gt_boxes (XYXY pixels of the
            resized image), gt_classes (K,) and, when ``with_masks``, gt_masks (BitMasks).
        images: the padded batch (its tensor gives Hp, Wp).

    Returns:
        One ProposalTargets per image: boxes (K, 4) normalised cxcywh w.r.t. (Wp, Hp), masks
        (K, Hp, Wp) bool or None, labels (K,) int64.

    Raises:
        KeyError: an input without "instances" (training needs annotations).
    """
    Hp, Wp = images.tensor.shape[-2:]
    device = images.tensor.device
    targets = []
    for i, x in enumerate(batched_inputs):
        if "instances" not in x:
            raise KeyError(f"training input {i} ({x.get('file_name', '?')}) has no 'instances'")
        inst = x["instances"].to(device)
        cx, cy, w, h = box_convert(inst.gt_boxes.tensor.float(), "xyxy", "cxcywh").unbind(-1)
        boxes = torch.stack((cx / Wp, cy / Hp, w / Wp, h / Hp), dim=-1)
        masks = None
        if with_masks:
            if not inst.has("gt_masks"):
                raise KeyError(f"input {x.get('file_name', i)} has no gt_masks but the task needs masks")
            m = inst.gt_masks.tensor if hasattr(inst.gt_masks, "tensor") else inst.gt_masks
            masks = torch.zeros(m.shape[0], Hp, Wp, dtype=torch.bool, device=device)
            masks[:, : m.shape[1], : m.shape[2]] = m.bool()
        targets.append(ProposalTargets(boxes=boxes.clamp(0, 1), masks=masks, labels=inst.gt_classes.long()))
    return targets


@register_task("detection")
class DetectionTask(Task):
    """Box detection (masks are not supervised, boxes still come from the proposals).

    Inputs: detection mapper dicts ("image", "height", "width"; "instances" in training).
    Option: ``class_names`` (inference only) replaces the training class names (open vocabulary).
    Training losses: the proposal losses + {"loss_class"}; eval: [{"instances": Instances}].
    """

    with_masks = False
    family = TaskFamily.LOCALIZATION
    input_modalities = input_modalities(Modality.IMAGE)
    reads = (REGIONAL_SEGMENT,)
    options = ("class_names",)
    localization = True
    needs_class_names = True
    test_batch_size = 1

    def encode_inputs(self, model, batched_inputs: Sequence[dict]) -> TaskInputs:
        enc = model.encode_image(
            batched_inputs, self.input_modalities, lambda images: instances_to_targets(batched_inputs, images, self.with_masks)
        )
        return TaskInputs(batch=enc.tokens.batch, image=enc, losses=dict(enc.proposal_losses))

    def encode_targets(self, model, batched_inputs, inputs, class_names: Optional[Sequence[str]] = None):
        return self.class_name_targets(model, class_names)

    def losses(self, model, outputs, targets, inputs, batched_inputs):
        enc = inputs.image
        return self.class_loss(outputs[REGIONAL_SEGMENT], enc.tokens.regional_index, targets.embeddings,
                               model.likelihood, enc.proposals.matches, enc.targets)

    def postprocess(self, model, outputs, targets, inputs, batched_inputs, **options):
        enc = inputs.image
        tokens = enc.tokens
        idx = tokens.regional_index
        return self.detections(
            model.likelihood(outputs[REGIONAL_SEGMENT], targets.embeddings),
            gather_proposals(enc.proposals.objectness, idx),
            gather_proposals(enc.proposals.boxes, idx),
            tokens.regional_masks if tokens.regional_masks is not None else enc.proposals.masks_of(idx),
            enc.images,
            batched_inputs,
        )

    def build_mapper(self, cfg, is_train: bool):
        return DetectionDatasetMapper(cfg, is_train=is_train, use_instance_mask=self.with_masks)

    def build_evaluator(self, cfg, dataset_name: str, output_dir: Optional[str] = None):
        kinds = ("bbox", "segm") if self.with_masks else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=kinds, distributed=True, output_dir=output_dir)

    def log_batch(self, batch: Sequence[dict], storage) -> None:
        """``<task>/gt_instances_min`` / ``_max``: ground-truth instances in one rank's batch
        (int), min / max over ranks. A min of 0 with a max > 0 marks an iteration where a rank
        trained on images without annotations while others had some (such a rank must give the
        same loss keys). Called on every rank (one small gather)."""
        n = sum(len(x["instances"]) for x in batch if isinstance(x, dict) and "instances" in x)
        counts = comm.gather(n)
        if comm.is_main_process():
            storage.put_scalar(f"{self.spec.name}/gt_instances_min", min(counts), smoothing_hint=False)
            storage.put_scalar(f"{self.spec.name}/gt_instances_max", max(counts), smoothing_hint=False)

    def class_loss(
        self,
        region_features: torch.Tensor,
        regional_index: torch.Tensor,
        class_embeddings: torch.Tensor,
        likelihood,
        matches,
        targets: List[ProposalTargets],
    ) -> Dict[str, torch.Tensor]:
        """Class loss of Eq. 7 for proposals matched to an object and kept as tokens.

        Args:
            region_features: (N, R, d) g's outputs at the regional tokens.
            regional_index: (N, R) int64 proposal index of each token.
            class_embeddings: (C, d) targets. likelihood: the Likelihood module.
            matches: per image (pred_idx, tgt_idx) from the proposal matcher.
            targets: ground truth (labels are contiguous class ids).

        Returns:
            {"loss_class": 0-dim float}; an exact, graph-connected zero when nothing matched.
        """
        feats, labels, kept = [], [], []
        for i, ((pred_idx, tgt_idx), tgt) in enumerate(zip(matches, targets)):
            if pred_idx.numel() == 0:
                continue
            # token of each matched proposal: (M, R) hits; a proposal without a token is masked
            # out of the mean (no host synchronisation to select the rows)
            hit = pred_idx.to(regional_index.device)[:, None] == regional_index[i][None, :]
            kept.append(hit.any(1))
            feats.append(region_features[i].index_select(0, hit.to(torch.uint8).argmax(1)))
            labels.append(tgt.labels[tgt_idx.to(tgt.labels.device)])
        if feats:
            logits = likelihood(torch.cat(feats), class_embeddings)
            target = torch.cat(labels).to(logits.device)
            valid = torch.cat(kept).to(logits.device)
        else:
            logits = likelihood(region_features[:, :0].reshape(0, region_features.shape[-1]), class_embeddings)
            target = torch.zeros(0, dtype=torch.long, device=logits.device)
            valid = None
        loss = likelihood.loss(logits, target, self.spec.loss_weight, valid=valid)
        # keep every class embedding in the graph even when nothing matched (DDP-safe)
        return {"loss_class": loss + 0.0 * class_embeddings.sum()}

    def detections(
        self,
        region_logits: torch.Tensor,
        objectness: torch.Tensor,
        boxes: torch.Tensor,
        masks: torch.Tensor,
        images: ImageList,
        batched_inputs: Sequence[dict],
    ) -> List[dict]:
        """Detections in input-image pixels, detectron2's output format.

        Args:
            region_logits: (N, R, C) float32 class logits of the regional tokens.
            objectness: (N, R) fg logits. boxes: (N, R, 4) normalised cxcywh (padded image).
            masks: (N, R, Hm, Wm) mask logits.
            images: the padded batch; ``images.image_sizes`` are the resized sizes.
            batched_inputs: give "height"/"width" of the original image (defaults: resized size).

        Returns:
            per image {"instances": Instances(pred_boxes XYXY pixels, scores, pred_classes,
            pred_masks (bool, original size; only for instance segmentation))}.
        """
        Hp, Wp = images.tensor.shape[-2:]
        C = region_logits.shape[-1]
        scores = objectness.float().sigmoid()[..., None] * region_logits.float().softmax(-1)  # (N, R, C)
        results = []
        for i, x in enumerate(batched_inputs):
            h, w = images.image_sizes[i]
            out_h, out_w = int(x.get("height", h)), int(x.get("width", w))
            k = min(self.test_topk, scores[i].numel())
            top, flat = scores[i].flatten().topk(k)
            r, cls = flat // C, flat % C
            xyxy = box_convert(boxes[i, r].float(), "cxcywh", "xyxy") * boxes.new_tensor([Wp, Hp, Wp, Hp]).float()
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w) * (out_w / w)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h) * (out_h / h)
            inst = Instances((out_h, out_w))
            inst.pred_boxes = Boxes(xyxy)
            inst.scores = top
            inst.pred_classes = cls
            if self.with_masks:
                inst.pred_masks = self.paste_masks(masks[i, r], (h, w), (Hp, Wp), (out_h, out_w))
            results.append({"instances": inst})
        return results

    @staticmethod
    def paste_masks(logits: torch.Tensor, size: Tuple[int, int], padded: Tuple[int, int], out: Tuple[int, int],
                    chunk: int = 4) -> torch.Tensor:
        """Binary masks at the original image's size: ``up2.layers.paste_masks.paste_masks``
        (the compiled kernel on CPU when built, else ``F.interpolate``).

        Args:
            logits: (K, Hm, Wm) mask logits of the padded image.  size: (h, w) resized image.
            padded: (Hp, Wp) padded size.  out: (out_h, out_w) original image size.
            chunk: masks resized at a time on the PyTorch path (the result does not depend on it).

        Returns:
            (K, out_h, out_w) bool: bilinear upsampling to (Hp, Wp), crop to (h, w), bilinear
            resize to ``out`` (skipped when ``out == size``), then ``> 0``.

        Raises:
            ValueError: ``chunk`` < 1 or inconsistent sizes.
        """
        return paste_masks(logits, size, padded, out, chunk=chunk)


@register_task("instance_segmentation")
class InstanceSegmentationTask(DetectionTask):
    """Detection plus mask supervision and mask outputs."""

    with_masks = True
