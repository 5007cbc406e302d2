#!/usr/bin/env python
"""Build a paper-size UP2 config on the meta device and count its parameters: all of them, and
the paper's deployment count (Tab. 6: Uni-Perceiver-v2 BASE = 308M).

    .venv/bin/python projects/benchmark/count_params.py configs/up2_R50.yaml configs/up2_swin_base.yaml

roberta-base cannot be downloaded here, so its architecture (``transformers.RobertaConfig()``
defaults: 12 layers, d=768, 50,265-token vocabulary) is written to a temporary folder as a
config with a small byte-level BPE tokenizer, and the model is built from that config through
the normal ``MODEL.TEXT_ENCODER.NAME`` path. Everything is built on the meta device (shapes,
no memory, no initialisation), so the count takes seconds. The tokenizer's size does not change
the count (the embedding table keeps 50,265 rows). COCO's class names come from detectron2's
built-in metadata, so no COCO files are needed.

Deployment count: each Conditional MoE layer counts as k FFNs (k = MOE.TOP_K) instead of E, the
other E - k experts' weights are left out. That is how the paper's 308M for BASE comes out (this
script gives 306.6M for ``up2_swin_base.yaml``, -0.5%: Swin-B 86.9M + proposal network 20.0M +
image-token heads 4.2M + RoBERTa-base 124.6M + g 70.9M with 2 FFNs per layer); counting the one
merged FFN each token actually runs would give 278.3M (-9.7%).
"""
from __future__ import annotations

import argparse
import os
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from up2.utils.parameter_count import parameter_counts  # noqa: E402  (the model card counts the same way)

PARTS = ("backbone", "proposal_network", "image_encoder", "text_encoder", "unified_decoder")


def write_roberta_base_config(folder: str) -> None:
    """roberta-base's config (no weights) and a small byte-level BPE tokenizer in ``folder``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a photo of a cat", "a person riding a horse"] * 4, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.save_model(folder)
    RobertaTokenizerFast.from_pretrained(folder).save_pretrained(folder)
    RobertaConfig().save_pretrained(folder)


def build_meta_model(config_path: str, text_folder: str):
    """The model of ``config_path`` on the meta device, text encoder from ``text_folder``'s config."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import up2  # noqa: F401
    from up2 import add_up2_config
    from up2.modeling.tasks import resolve_task_data

    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(config_path)
    cfg.MODEL.TEXT_ENCODER.NAME = text_folder
    cfg.MODEL.TEXT_ENCODER.RANDOM_INIT = True  # the architecture from the folder's config, no weight file
    cfg.MODEL.WEIGHTS = ""  # nothing is loaded: the configs' pretrained backbones are not needed to count
    cfg.MODEL.BACKBONE.RANDOM_INIT = True
    cfg.MODEL.DEVICE = "meta"
    cfg = resolve_task_data(cfg)  # class names from the datasets' metadata (no files are read)
    with torch.device("meta"):
        return build_model(cfg)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    args = parser.parse_args(argv)

    from tabulate import tabulate

    rows = []
    with tempfile.TemporaryDirectory() as roberta:
        write_roberta_base_config(roberta)
        for path in args.configs:
            full, deployed, parts = parameter_counts(build_meta_model(path, roberta))
            rows.append([os.path.basename(path), *(f"{parts.get(k, 0) / 1e6:.1f}M" for k in PARTS),
                         f"{full / 1e6:.1f}M", full, f"{deployed / 1e6:.1f}M", deployed])
    print(tabulate(rows, headers=["config", "backbone", "proposal", "f_image tokens", "f_text", "g", "total", "exact",
                                  "deployment (k experts per MoE)", "exact"], tablefmt="github"))


if __name__ == "__main__":
    main()
