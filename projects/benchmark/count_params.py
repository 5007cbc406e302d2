#!/usr/bin/env python
"""Build a paper-size UP2 config with random weights on the CPU and count its parameters.

    .venv/bin/python projects/benchmark/count_params.py configs/up2_R50.yaml configs/up2_swin_base.yaml

roberta-base cannot be downloaded here, so a RoBERTa with roberta-base's architecture
(``transformers.RobertaConfig()`` defaults: 12 layers, d=768, 50,265-token vocabulary) and
random weights is written to a temporary folder with a small byte-level BPE tokenizer and
loaded through the normal ``MODEL.TEXT_ENCODER.NAME`` path. The tokenizer's size does not
change the count (the embedding table keeps 50,265 rows). COCO's class names come from
detectron2's built-in metadata, so no COCO files are needed.
"""
from __future__ import annotations

import argparse
import os
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_random_roberta_base(folder: str) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a photo of a cat", "a person riding a horse"] * 4, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.save_model(folder)
    RobertaTokenizerFast.from_pretrained(folder).save_pretrained(folder)
    RobertaModel(RobertaConfig()).save_pretrained(folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    args = parser.parse_args(argv)

    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from tabulate import tabulate

    import up2  # noqa: F401
    from up2 import add_up2_config
    from up2.modeling.tasks import resolve_task_data

    rows = []
    with tempfile.TemporaryDirectory() as roberta:
        write_random_roberta_base(roberta)
        for path in args.configs:
            cfg = get_cfg()
            add_up2_config(cfg)
            cfg.merge_from_file(path)
            cfg.MODEL.TEXT_ENCODER.NAME = roberta
            cfg.MODEL.DEVICE = "cpu"
            cfg = resolve_task_data(cfg)  # class names from the datasets' metadata (no files are read)
            torch.manual_seed(0)
            model = build_model(cfg)
            parts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
            total = sum(p.numel() for p in model.parameters())
            rows.append([os.path.basename(path), *(f"{parts.get(k, 0) / 1e6:.1f}M" for k in
                         ("backbone", "proposal_network", "image_encoder", "text_encoder", "unified_decoder")),
                         f"{total / 1e6:.1f}M", total])
    print(tabulate(rows, headers=["config", "backbone", "proposal", "f_image tokens", "f_text", "g", "total", "exact"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
