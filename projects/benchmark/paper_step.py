#!/usr/bin/env python
"""One real training iteration of every task of a paper config, at paper input sizes, on the CPU.

    .venv/bin/python projects/benchmark/paper_step.py configs/up2_R50.yaml configs/up2_swin_base.yaml \
        --markdown docs/paper_scale.md

What runs: the config as a user trains it (``build_model``, the trainer's ``build_optimizer``
(TBGN), each task's own training mapper, ``model(batch, task=name)``, backward, optimizer step),
with random weights: backbone random, the text encoder RoBERTa-base's architecture with random
weights and a 50,265-token byte-level BPE tokenizer (``random_roberta.py``; nothing is
downloaded). Inputs are synthetic records pushed through the task's training mapper: a 640x480
photo-sized image (detection / segmentation: large-scale jitter to 1024x1024 with 10 polygon
instances; the other image tasks: the config's ResizeShortestEdge, 800 px), a 12-word caption,
and a 600-word document for masked LM (truncated by the tokenizer to 512 tokens). One image (or
document) per rank, fp32 (CPU bf16 autocast without AMX is several times slower than fp32).

Printed per task: seconds of the step, peak resident memory of the process, the parameters that
received a gradient, and an estimate of GPU memory per rank at the config's per-GPU batch
(``IMS_PER_BATCH / --num-gpus``):

    fixed        = 16 bytes per parameter (fp32 weight, gradient, and the two moments of TBGN/AdamW)
    activations  = per-GPU batch x (bytes saved for backward at batch 1, target sets excluded)
    target set   = what the task's fixed target set (class names, vocabulary) keeps for backward,
                   plus the one chunk whose activations live while it is recomputed
    estimate     = fixed + activations + target set

"Bytes saved for backward" are the distinct storages that autograd's saved-tensor hooks see
during the forward (parameters excluded), i.e. the activation memory between forward and
backward; they scale with the batch, the target sets do not. Transient workspaces (e.g.
attention scores rebuilt in the backward) are not counted, and fp32 is an upper bound for the
configs' bf16 autocast.

Fixed target sets (paper §4.2; ``up2.modeling.target_set.encode_text_targets``) are probed per
row (the bytes and seconds of 2n rows minus those of n rows, over n; ``--vocab-probe``), then
scaled to the set's size C (1,000 ImageNet class names, V = 50,265 vocabulary tokens):

    before (f_text embedding layer + g with autograd, up2 before §4.2 was followed) = V x b_old
    §4.2 without the memory measures (full f_text + g with autograd)                = V x b_full
    after  (chunks recomputed, sharded over G ranks)  = ceil(V/G) x b_kept + min(chunk, ceil(V/G)) x b_full
                                                        (chunk = CHUNK_TOKENS / 3 rows)
                                                        + V x d x 4 (the gathered embeddings)

On two CPU cores a full-vocabulary step takes tens of minutes, so ``--vocab-tokens`` (default
2,048) encodes only the first tokens of the vocabulary through f_text and g and reuses their
embeddings for the other rows (the logits keep all V columns); the table's "s (full V)" adds
the measured per-token time of the rest.

``--ranks 2`` also runs the captioning forward and backward with 2 gloo processes (DDP as the
trainer wraps the model; no optimizer step, whose state would not fit two ranks into this
machine's RAM) and prints how many vocabulary tokens each rank encoded.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import resource
import sys
import tempfile
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("a man riding a horse on a dirt road next to a green field with trees and a small red barn in the "
         "distance while two dogs run beside him").split()


# ---- inputs ------------------------------------------------------------------------------------
def _image_file(folder: str) -> str:
    import numpy as np
    from PIL import Image

    path = os.path.join(folder, "photo.jpg")
    if not os.path.exists(path):
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _record(task_type: str, folder: str, num_classes: int) -> dict:
    """One dataset record of ``task_type`` (the formats of ``up2.data.datasets``)."""
    from detectron2.structures import BoxMode

    if task_type == "masked_lm":
        return {"text": " ".join(WORDS[i % len(WORDS)] for i in range(600)), "doc_id": 0}
    rec = {"file_name": _image_file(folder), "image_id": 1, "height": 480, "width": 640}
    if task_type in ("detection", "instance_segmentation"):
        anns = []
        for i in range(10):
            x, y = 20 + 60 * i, 30 + 40 * i
            anns.append({"bbox": [x, y, 50, 40], "bbox_mode": BoxMode.XYWH_ABS, "category_id": i % num_classes,
                         "iscrowd": 0, "segmentation": [[x, y, x + 50, y, x + 50, y + 40, x, y + 40]]})
        rec["annotations"] = anns
    elif task_type == "classification":
        rec["class_id"] = 3 % num_classes
    else:  # retrieval, captioning
        rec["captions"] = [" ".join(WORDS[:12])]
    return rec


# ---- measurement ---------------------------------------------------------------------------------
class SavedBytes:
    """Distinct storages saved for backward during a forward (parameters excluded), split into
    the fixed target sets' share (class names, vocabularies: batch-independent) and the rest."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: Dict[int, tuple] = {}
        self.set_ptrs = set()
        self.in_set = False
        self.set_rows = 0  # rows of the fixed target set (class names, vocabulary) of the step

    def _pack(self, t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.params and ptr not in self.seen and st.nbytes() > 0:
            self.seen[ptr] = (st.nbytes(), self.in_set)
        return t

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def totals(self):
        target_set = sum(n for p, (n, v) in self.seen.items() if v or p in self.set_ptrs)
        return sum(n for n, _ in self.seen.values()) - target_set, target_set


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _wrap_target_sets(model, limit: int, meter_ref: list, counts: list):
    """Route the fixed target sets (class names: ``embed_texts`` with ``cache``; vocabularies:
    ``embed_tokens_as_targets``) through the meter, counting the rows this rank encodes; with
    ``limit`` > 0 a vocabulary encodes only its first ``limit`` ids through f_text and g and
    reuses their rows for the others."""
    import torch

    from up2.modeling.target_set import TargetEmbeddings

    forward = model.text_encoder.forward
    inside = [False]

    def counted(input_ids, attention_mask):
        if inside[0]:
            counts.append(input_ids.shape[0])
        return forward(input_ids, attention_mask)

    model.text_encoder.forward = counted

    @contextlib.contextmanager
    def target_set():
        meter = meter_ref[0]
        inside[0] = True
        if meter is not None:
            meter.in_set = True
        try:
            yield meter
        finally:
            inside[0] = False
            if meter is not None:
                meter.in_set = False

    def mark(meter, out):
        if meter is not None:
            meter.set_ptrs.add(out.embeddings.untyped_storage().data_ptr())
        return out

    embed_tokens, embed_texts = model.embed_tokens_as_targets, model.embed_texts

    def tokens(token_ids, inputs, key):
        with target_set() as meter:
            if meter is not None:
                meter.set_rows = token_ids.numel()
            if limit and token_ids.numel() > limit:
                sub = embed_tokens(token_ids[:limit], inputs, (*key, "first", limit))
                out = TargetEmbeddings(sub.embeddings[torch.arange(token_ids.numel()) % limit], sub.aux_loss)
            else:
                out = embed_tokens(token_ids, inputs, key)
        return mark(meter, out)

    def texts(names, inputs, cache=True):
        if not cache:
            return embed_texts(names, inputs, cache)
        with target_set() as meter:
            if meter is not None:
                meter.set_rows = len(names)
            out = embed_texts(names, inputs, cache)
        return mark(meter, out)

    model.embed_tokens_as_targets, model.embed_texts = tokens, texts


def load_config(config: str):
    from detectron2.config import get_cfg

    from up2 import add_up2_config

    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(config)
    return cfg


def random_weights_cfg(cfg, text_encoder: str, device: str = "cpu"):
    """``cfg`` set up for random weights on ``device`` (text encoder from the folder
    ``text_encoder``, no backbone weights), its tasks' class names and vocabularies resolved."""
    from up2.modeling.tasks import resolve_task_data

    cfg.MODEL.TEXT_ENCODER.NAME = text_encoder
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""  # the paper configs name pretrained backbones; this measures random ones
    cfg.MODEL.BACKBONE.RANDOM_INIT = True
    return resolve_task_data(cfg)


def build(config: str, roberta: str, vocab_tokens: int):
    import torch
    from detectron2.modeling import build_model

    from up2.engine.trainer import build_optimizer

    cfg = random_weights_cfg(load_config(config), roberta)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    meter_ref, counts = [None], []
    _wrap_target_sets(model, vocab_tokens, meter_ref, counts)
    return cfg, model, build_optimizer(cfg, model), meter_ref, counts


def train_step(cfg, model, optimizer, name: str, folder: str, meter_ref: list, ddp_model=None) -> dict:
    """One training iteration of task ``name`` as ``MultiTaskStep.run_step`` makes it (fp32)."""
    import torch

    from up2.engine.trainer import build_mapper
    from up2.modeling.tasks.base import task_specs_from_config
    from up2.solver.tbgn import TBGN

    spec = task_specs_from_config(cfg)[name]
    num_classes = len(spec.class_names or []) or 1
    batch = [build_mapper(cfg, spec, is_train=True)(copy.deepcopy(_record(spec.type, folder, num_classes)))]
    meter = SavedBytes(model)
    meter_ref[0] = meter
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with meter.hooks():
        losses = (ddp_model or model)(batch, task=name)
    loss = sum(losses.values())
    forward_s = time.perf_counter() - start
    meter_ref[0] = None
    loss.backward()
    if optimizer is not None:
        if isinstance(optimizer, TBGN):
            optimizer.set_task(1.0, spec.grad_weight)
        optimizer.step()
    seconds = time.perf_counter() - start
    got = [p for p in model.parameters() if p.grad is not None]
    batch_bytes, set_bytes = meter.totals()
    image = batch[0].get("image")
    return {"task": name, "type": spec.type, "seconds": seconds, "forward_s": forward_s,
            "input": "x".join(map(str, image.shape[-2:])) if image is not None else "512 tokens",
            "loss": float(loss.detach()), "params_with_grad": sum(p.numel() for p in got),
            "tensors_with_grad": len(got), "saved_batch_bytes": batch_bytes, "saved_set_bytes": set_bytes, "set_rows": meter.set_rows,
            "per_gpu_batch": max(1, spec.ims_per_batch // ARGS.num_gpus)}


def target_set_probe(model, input_ids, attention_mask, inputs, n: int, old: bool = False) -> dict:
    """Per-row bytes saved for backward and seconds (forward + backward) of a fixed target set:
    the difference between ``2n`` and ``n`` rows, divided by ``n`` (so per-call constants, e.g.
    MoE's merged expert weights, do not count per row). ``full``: f_text + g with autograd;
    ``kept``: the same, recomputed (what a checkpointed chunk keeps); ``old`` (vocabulary only):
    f_text's embedding layer + g with autograd, as up2 encoded vocabularies before §4.2."""
    import torch

    from up2.modeling.target_set import encode_targets, encode_text_targets

    te, g = model.text_encoder, model.unified_decoder
    modes = {
        "full": lambda ids, mask: encode_text_targets(te, g, ids, mask, inputs, chunk_tokens=ids.numel()),
        "kept": lambda ids, mask: encode_text_targets(te, g, ids, mask, inputs, chunk_tokens=ids.numel(), recompute=True),
    }
    if old:
        modes["old"] = lambda ids, mask: encode_targets(g, te.embed_tokens(ids[:, 1:2]),
                                                        torch.zeros(ids.shape[0], 1, dtype=torch.bool), inputs)
    out = {}
    for label, fn in modes.items():
        measured = []
        for rows in (n, 2 * n):
            meter = SavedBytes(model)
            start = time.perf_counter()
            with meter.hooks():
                emb = fn(input_ids[:rows], attention_mask[:rows]).embeddings
            emb.sum().backward()
            measured.append((sum(b for b, _ in meter.seen.values()), time.perf_counter() - start))
            model.zero_grad(set_to_none=True)
        out[f"{label}_bytes_per_row"] = max(0.0, (measured[1][0] - measured[0][0]) / n)
        out[f"{label}_s_per_row"] = max(0.0, (measured[1][1] - measured[0][1]) / n)
    return out


def set_transient_bytes(probe: dict, rows: int, chunk_rows: int, world: int) -> float:
    """The activations of the one chunk that lives while it is recomputed in the backward pass."""
    return min(chunk_rows, math.ceil(rows / world)) * probe["full_bytes_per_row"]


def vocabulary_bytes(probe: dict, V: int, d: int, chunk_rows: int, world: int) -> dict:
    return {"before_embedding_layer_only": V * probe["old_bytes_per_row"],
            "section_4_2_plain_autograd": V * probe["full_bytes_per_row"],
            "after": math.ceil(V / world) * probe["kept_bytes_per_row"] + set_transient_bytes(probe, V, chunk_rows, world)
            + V * d * 4}


# ---- gloo ranks -----------------------------------------------------------------------------
def _rank_main(rank: int, world: int, port: int, config: str, roberta: str, folder: str, name: str, out: str,
               args: argparse.Namespace):
    global ARGS
    ARGS = args
    import torch
    import torch.distributed as dist

    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg, model, _, meter_ref, counts = build(config, roberta, ARGS.vocab_tokens)
        ddp = DistributedDataParallel(model, broadcast_buffers=False, find_unused_parameters=True,  # as UP2Trainer
                                      gradient_as_bucket_view=True)  # no second copy of the gradients
        # forward + DDP backward only: two ranks' optimizer states do not fit this machine's RAM
        row = train_step(cfg, model, None, name, folder, meter_ref, ddp_model=ddp)
        row.update(rank=rank, vocab_tokens_encoded=sum(counts), peak_rss_gb=_peak_rss_gb())
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(row, f)
    finally:
        dist.destroy_process_group()


def run_ranks(config: str, roberta: str, folder: str, name: str, world: int) -> List[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        # spawned (not forked) ranks start small: two ranks of a paper-size model and the parent
        # fill this machine's RAM
        mp.start_processes(_rank_main, args=(world, port, config, roberta, folder, name, out, ARGS), nprocs=world,
                           start_method="spawn")
        return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


# ---- main -----------------------------------------------------------------------------------
def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def main(argv=None):
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--tasks", nargs="*", default=None, help="task names (default: every task of the config)")
    parser.add_argument("--num-gpus", type=int, default=8, help="GPUs the configs' global batches are split over")
    parser.add_argument("--vocab-tokens", type=int, default=2048,
                        help="vocabulary tokens encoded through f_text and g per step (0 = all; see the docstring)")
    parser.add_argument("--vocab-probe", type=int, default=32, help="rows n of the per-row target-set probes (n and 2n)")
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks of the captioning step (0/1 = skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", default=None, help="also write the tables to this Markdown file")
    parser.add_argument("--json", default=None, help="also write every measurement as strict JSON here")
    ARGS = parser.parse_args(argv)

    import torch
    from tabulate import tabulate

    import up2  # noqa: F401
    from random_roberta import ROBERTA_BASE_VOCAB, write_random_roberta_base
    from up2.modeling.token_attributes import Modality, input_modalities

    torch.set_num_threads(ARGS.threads)
    results, md = [], []
    with tempfile.TemporaryDirectory() as roberta, tempfile.TemporaryDirectory() as folder:
        write_random_roberta_base(roberta, [" ".join(WORDS)] * 20)
        for config in ARGS.configs:
            ranks_md = []
            if ARGS.ranks > 1:
                cfg0 = load_config(config)
                captioning = [n for n in (ARGS.tasks or list(cfg0.TASKS.keys())) if cfg0.TASKS[n].TYPE == "captioning"]
                if captioning:  # first, while this process is small
                    ranks = run_ranks(config, roberta, folder, captioning[0], ARGS.ranks)
                    rank_table = [[r["rank"], r["vocab_tokens_encoded"], f"{r['seconds']:.1f}", f"{r['peak_rss_gb']:.1f}",
                                   f"{r['loss']:.4f}"] for r in ranks]
                    rank_headers = ["rank", "vocabulary tokens encoded", "s (forward + backward)", "peak RSS GB", "loss"]
                    print(tabulate(rank_table, headers=rank_headers, tablefmt="github"))
                    ranks_md = [f"Captioning with {ARGS.ranks} gloo ranks (DDP, forward + backward; "
                                f"{ARGS.vocab_tokens or ROBERTA_BASE_VOCAB} vocabulary tokens encoded per step "
                                "over all ranks):", "", tabulate(rank_table, headers=rank_headers, tablefmt="github"), ""]
            cfg, model, optimizer, meter_ref, _ = build(config, roberta, ARGS.vocab_tokens)
            n_params = sum(p.numel() for p in model.parameters())
            fixed = 16 * n_params
            d = cfg.MODEL.UNIFIED_DECODER.EMBED_DIM
            chunk_tokens = cfg.MODEL.TARGET_SETS.CHUNK_TOKENS
            chunk = chunk_tokens // 3  # vocabulary rows per chunk: <s> v </s>
            V = ROBERTA_BASE_VOCAB
            te = model.text_encoder
            vocab_ids = te.frame_single_tokens(torch.arange(5, 5 + 2 * ARGS.vocab_probe))
            probe = target_set_probe(model, *vocab_ids, input_modalities(Modality.IMAGE, Modality.TEXT),
                                     ARGS.vocab_probe, old=True)
            vocab = vocabulary_bytes(probe, V, d, chunk, ARGS.num_gpus)
            names = ARGS.tasks or list(cfg.TASKS.keys())
            rows = []
            for name in names:
                row = train_step(cfg, model, optimizer, name, folder, meter_ref)
                row["peak_rss_gb"] = _peak_rss_gb()
                set_probe = None
                if row["type"] in ("captioning", "masked_lm"):
                    set_probe = probe
                elif row["set_rows"]:  # class names: probe their own rows
                    class_names = list(cfg.TASKS[name].CLASS_NAMES)
                    batch = te.tokenize((class_names * 2)[: 2 * ARGS.vocab_probe])
                    row["chunk_rows"] = max(1, chunk_tokens // te.tokenize(class_names)["input_ids"].shape[1])
                    set_probe = target_set_probe(model, batch["input_ids"], batch["attention_mask"],
                                                 input_modalities(Modality.IMAGE), ARGS.vocab_probe)
                    row["class_name_probe"] = set_probe
                uses_vocab = row["type"] in ("captioning", "masked_lm")
                rest = (V - ARGS.vocab_tokens) if (uses_vocab and ARGS.vocab_tokens) else 0
                row["seconds_full_vocab"] = row["seconds"] + rest * probe["kept_s_per_row"]
                set_rows = V if uses_vocab else row["set_rows"]
                row["target_set_bytes"] = (row["saved_set_bytes"] + set_transient_bytes(set_probe, set_rows, row.get("chunk_rows", chunk),
                                                                                 ARGS.num_gpus)
                                           if set_probe else row["saved_set_bytes"])
                row["estimate_bytes"] = fixed + row["per_gpu_batch"] * row["saved_batch_bytes"] + row["target_set_bytes"]
                rows.append(row)
                print(f"[{os.path.basename(config)}] {name}: {row['seconds']:.1f} s, est. {_gb(row['estimate_bytes'])} GB",
                      flush=True)
            table = [[r["task"], r["input"], f"{r['seconds']:.1f}",
                      f"{r['seconds_full_vocab']:.0f}" if r["type"] in ("captioning", "masked_lm") else "",
                      f"{r['peak_rss_gb']:.1f}", f"{r['params_with_grad'] / 1e6:.1f}M", r["per_gpu_batch"],
                      _gb(r["saved_batch_bytes"]), f"{r['set_rows']:,}" if r["set_rows"] else "",
                      _gb(r["target_set_bytes"]) if r["set_rows"] else "", _gb(r["estimate_bytes"])] for r in rows]
            headers = ["task", "input (HxW)", "s (step)", "s (full V)", "peak RSS GB", "params with grad",
                       "per-GPU batch", "act. GB / image", "target set", "target set GB", "est. GB / GPU"]
            title = (f"{os.path.basename(config)}: {n_params / 1e6:.1f}M parameters, fixed {_gb(fixed)} GB "
                     f"(16 B / parameter), {ARGS.num_gpus} GPUs")
            vocab_rows = [["f_text embedding layer + g, autograd (before)", _gb(vocab["before_embedding_layer_only"])],
                          ["f_text + g, autograd, no chunking (§4.2, plain)", _gb(vocab["section_4_2_plain_autograd"])],
                          [f"f_text + g, chunks of {chunk_tokens:,} text tokens recomputed, sharded over {ARGS.num_gpus} (after)",
                           _gb(vocab["after"])]]
            print(title)
            print(tabulate(table, headers=headers, tablefmt="github"))
            print(tabulate(vocab_rows, headers=[f"vocabulary targets (V = {V:,}, d = {d})", "GB / GPU"],
                           tablefmt="github"))
            md += [f"### {title}", "", tabulate(table, headers=headers, tablefmt="github"), "",
                   tabulate(vocab_rows, headers=[f"vocabulary targets (V = {V:,}, d = {d})", "GB / GPU"],
                            tablefmt="github"), ""]
            entry = {"config": config, "parameters": n_params, "fixed_bytes": fixed, "vocabulary_probe": probe,
                     "vocabulary_bytes": vocab, "tasks": rows}
            if ranks_md:
                entry["captioning_ranks"] = ranks
                md += ranks_md
            del model, optimizer
            results.append(entry)
    if ARGS.markdown:
        with open(ARGS.markdown, "w") as f:
            f.write("\n".join(md))
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump(results, f, indent=1, allow_nan=False)


ARGS = None

if __name__ == "__main__":
    main()
