#!/usr/bin/env python
"""Inference speed of up2 per task, next to detectron2's Mask R-CNN and Hugging Face's Mask2Former.

    python projects/benchmark/speed.py                                  # UP2-R50 on the CPU, 800x1067 and 512x683
    python projects/benchmark/speed.py --sizes 512x683 --rows det,maskrcnn --precision fp32 --profile

Random weights (nothing is downloaded), batch 1 unless a row says otherwise, eval mode,
``torch.inference_mode``. Each row: ``--warmup`` untimed calls, then the median of ``--repeats``
timed calls, seconds per image; ratios are to the peer at the same size and precision (bf16:
every call under ``torch.autocast(bfloat16)``; up2 through ``TEST.AMP``). Siblings: ``timing.py``
(``--paired``: round-robin rounds, median per-round ratio), ``flops.py`` (GFLOPs, fp32 rows),
``peers.py`` (the peers and their set-up), ``profiling.py`` (``--profile``: component shares).

up2 is ``--config``'s architecture with its tasks replaced by instance segmentation (COCO's 80
names), classification (1,000 ImageNet names), greedy captioning (the end token masked, so that
random weights decode ``--caption-length`` tokens) and retrieval. A ``roberta-base`` text encoder
becomes a random one of its size (``random_roberta.py``). Writes ``speed.json`` to ``--output``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

try:  # imported as projects.benchmark.speed, or run as a script (then this folder is on sys.path)
    from . import flops, peers, profiling, random_roberta, timing
except ImportError:
    import flops, peers, profiling, random_roberta, timing  # noqa: E401

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UP2_ROWS = ("det", "det-nchw", "image", "cls", "caption", "retrieval")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def parse_sizes(text: str):
    """'800x1067,512x683' -> [(800, 1067), (512, 683)] (height x width in pixels, each >= 32)."""
    try:
        sizes = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(hw) != 2 or min(hw) < 32 for hw in sizes):
        raise argparse.ArgumentTypeError(f"--sizes: expected HxW[,HxW...], at least 32 px each, got {text!r}")
    return sizes


def class_names_1000():
    """ImageNet's 1,000 class names (torchvision's table)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def build_up2(config: str, device: str, text_folder: str, names, caption_length: int):
    """The model of ``config`` with the four benchmarked tasks (no data is read: COCO's class names
    come from detectron2's metadata)."""
    from detectron2.config import CfgNode, get_cfg
    from detectron2.modeling import build_model

    from up2 import add_up2_config
    from up2.modeling.inference import prepare_for_inference
    from up2.modeling.tasks import resolve_task_data

    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(config)
    if os.path.basename(os.path.normpath(cfg.MODEL.TEXT_ENCODER.NAME)) == "roberta-base":  # the paper configs
        random_roberta.write_random_roberta_base(text_folder, names + [f"a photo of a {n}" for n in names])
        cfg.MODEL.TEXT_ENCODER.NAME = text_folder
    cfg.MODEL.DEVICE = device
    coco = {"TRAIN": ["coco_2017_train"], "TEST": ["coco_2017_val"]}
    cfg.TASKS = CfgNode({
        "SPEED_SEG": {"TYPE": "instance_segmentation", "DATASETS": coco},
        "SPEED_CLS": {"TYPE": "classification", "DATASETS": coco},
        "SPEED_CAP": {"TYPE": "captioning", "DATASETS": coco, "VOCABULARY": "full", "BEAM_SIZE": 1,
                      "MAX_CAPTION_LENGTH": caption_length},
        "SPEED_RET": {"TYPE": "retrieval", "DATASETS": coco},
    })
    cfg = resolve_task_data(cfg)
    cfg.freeze()
    torch.manual_seed(0)
    return prepare_for_inference(build_model(cfg))  # eval + the inference rewrites, as the predictors


def random_image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def set_channels_last(model, on: bool) -> None:
    """The ``channels_last`` rewrite on or off: backbone, proposal network and padded batches NHWC / NCHW."""
    fmt = torch.channels_last if on else torch.contiguous_format
    model.backbone.to(memory_format=fmt)
    model.proposal_network.to(memory_format=fmt)


def up2_calls(model, size, args, names):
    """[(key, label, call, count_flops or None, images per call, warm-up calls)] of the selected
    up2 rows; ``count_flops()`` returns a ``flops`` result."""
    from up2.modeling.decoder_outputs import SPE
    from up2.modeling.token_attributes import Modality, input_modalities

    h, w = size
    one = [{"image": random_image(h, w, h * 10000 + w), "height": h, "width": w}]
    batch = [{"image": random_image(h, w, i), "height": h, "width": w} for i in range(args.retrieval_batch)]

    def image_only(inputs):  # f_image + g up to the [SPE] token (classification, retrieval: image input)
        with model.inference_autocast():
            return model.unified_decoder(model.encode_image(inputs, input_modalities(Modality.IMAGE)).tokens.batch, read=(SPE,)).spe

    def det(inputs):
        return model(inputs, task="SPEED_SEG")

    def cls(inputs):
        return model(inputs, task="SPEED_CLS", class_names=names)

    def retrieval(inputs):
        return image_only(inputs)

    def caption():
        return model(one, task="SPEED_CAP", beam_size=1, max_length=args.caption_length)

    def traced(fn):
        return lambda: flops.count_flops(flops.Call(model, fn), (one,), True)

    calls = [("det", "up2 detection+segmentation (80 names, cached)", lambda: det(one), traced(det), 1, args.warmup),
             ("det-nchw", "the same, NCHW (MODEL.CHANNELS_LAST False)", lambda: det(one), None, 1, args.warmup),
             ("image", "up2 image-only forward", lambda: image_only(one), traced(image_only), 1, args.warmup),
             ("cls", f"up2 classification, {len(names)} names (cached)", lambda: cls(one), traced(cls), 1,
              max(args.warmup, 1)),
             ("caption", f"up2 greedy captioning, {args.caption_length} tokens", caption,
              lambda: flops.count_flops_dispatch(model, caption), 1, max(args.warmup, 1)),  # ids leave the graph
             ("retrieval", "up2 retrieval embedding", lambda: retrieval(one), traced(retrieval), 1, args.warmup),
             ("retrieval", f"up2 retrieval embedding, batch {len(batch)} (per image)",
              lambda: retrieval(batch), None, len(batch), args.warmup)]
    return [c for c in calls if c[0] in args.rows]


def _no_end_token(model):
    """A forward hook on the likelihood that rules out the end and padding tokens (returns its handle)."""
    te = model.text_encoder
    ids = torch.tensor([te.special_ids.sep, te.special_ids.pad])
    ends = model.tasks["SPEED_CAP"].vocabulary(te).index_of(ids, te)
    ends = ends[ends >= 0].to(model.device)
    return model.likelihood.register_forward_hook(lambda m, i, logits: logits.index_fill(-1, ends, float("-inf")))


def up2_rows(model, size, precision: str, args, names, first_size: bool) -> list:
    """Rows of up2 at one size and precision (set ``model.inference_amp`` first); at the first
    size, classification and captioning also report their first call, which embeds the targets."""
    rows, channels_last = [], model.channels_last
    for key, label, fn, count, per, warmup in up2_calls(model, size, args, names):
        print(f"  {label} ...", flush=True)
        if key == "det-nchw":
            if not channels_last:
                print("    skipped: the config already builds NCHW convolutions", flush=True)
                continue
            set_channels_last(model, False)
        hook = _no_end_token(model) if key == "caption" else None
        try:
            with torch.inference_mode():
                r = timing.measure([fn], args.device, [warmup], args.repeats)[0]
            if args.flops and precision == "fp32" and count is not None:
                r.update(count())
        finally:
            set_channels_last(model, channels_last)
            if hook is not None:
                hook.remove()
        rows.append(dict(r, key=key, label=label, s_per_img=r["median_s"] / per))
        if first_size and key in ("cls", "caption"):  # the first call embedded the target set
            rows.append(dict(key=f"{key}:first", label="  the same, first call (embeds the targets)",
                             s_per_img=r["first_s"]))
    return rows


def autocast(device: str, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device.split(":")[0], dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def peer_rows(models: dict, size, precision: str, args) -> list:
    rows, image = [], random_image(*size, seed=sum(size))
    for key, model in models.items():
        print(f"  {peers.LABELS[key]} ...", flush=True)
        fn, flop_fn, flop_inputs, d2_style = peers.peer_call(key, model, image, args.device)
        with torch.inference_mode(), autocast(args.device, precision):
            r = timing.measure([fn], args.device, [args.warmup], args.repeats)[0]
        if args.flops and precision == "fp32":
            r.update(flops.count_flops(flops.Call(model, flop_fn), flop_inputs, d2_style))
        rows.append(dict(r, key=key, label=peers.LABELS[key], s_per_img=r["median_s"]))
    return rows


def paired(model, models: dict, size, precision: str, args) -> dict:
    """{peer: median over ``args.paired`` rounds of (up2 det+seg s / peer s)}, one warm-up each."""
    image = random_image(*size, seed=sum(size))
    one = [{"image": image, "height": size[0], "width": size[1]}]

    def under_autocast(fn):
        def run():
            with autocast(args.device, precision):
                fn()
        return run

    calls = {k: under_autocast(peers.peer_call(k, m, image, args.device)[0]) for k, m in models.items()}
    print(f"  paired: up2 det+seg vs {', '.join(calls)} ({args.paired} rounds) ...", flush=True)
    with torch.inference_mode():
        return timing.paired_ratios(lambda: model(one, task="SPEED_SEG"), calls, args.device, args.paired)


def table(rows) -> tuple:
    by = {(r["key"], r["size"], r["precision"]): r["s_per_img"] for r in rows}
    body = []
    for r in rows:
        ratios = [r["s_per_img"] / by[p] if p in by else None
                  for p in ((k, r["size"], r["precision"]) for k in peers.LABELS)]
        body.append([r["size"], r["precision"], r["label"], f"{r['s_per_img']:.3f}",
                     *("" if x is None else f"{x:.2f}" for x in ratios),
                     f"{r['gflops']:.1f}" if "gflops" in r else r.get("error", "")])
    return ["size", "precision", "task / model", "s/img", "/ Mask R-CNN", "/ Mask2Former", "GFLOPs"], body


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "up2_R50.yaml"))
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("800x1067,512x683"), help="HxW[,HxW...]")
    every = UP2_ROWS + tuple(peers.LABELS)
    parser.add_argument("--rows", default=",".join(every), help=f"comma list from {','.join(every)}")
    parser.add_argument("--precision", default="fp32,bf16", help="comma list from fp32,bf16")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per row before timing")
    parser.add_argument("--paired", type=int, default=0, metavar="ROUNDS", help="also time up2 det+seg and the "
                        "peers round-robin for ROUNDS rounds; report the median per-round ratio (0: off)")
    parser.add_argument("--profile", action="store_true", help="component shares of up2 det+seg")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP counts")
    parser.add_argument("--caption-length", type=int, default=20)
    parser.add_argument("--retrieval-batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--output", default=os.path.join(REPO, "output", "benchmark"))
    args = parser.parse_args(argv)
    args.rows = set(args.rows.split(","))
    if args.rows - set(every):
        parser.error(f"--rows: unknown {sorted(args.rows - set(every))}")
    args.precision = list(dict.fromkeys(p.strip() for p in args.precision.split(",")))
    if set(args.precision) - set(PRECISIONS):
        parser.error(f"--precision: choose from {sorted(PRECISIONS)}")
    if args.repeats < 1 or args.warmup < 0 or args.paired < 0:
        parser.error("--repeats must be >= 1, --warmup and --paired >= 0")
    if (args.paired or args.profile) and "det" not in args.rows:
        parser.error("--paired and --profile time up2 det+seg: add det to --rows")
    if args.threads:
        torch.set_num_threads(args.threads)
    from tabulate import tabulate

    from up2.utils import write_json_atomic

    start, names = time.perf_counter(), class_names_1000()
    rows, profiles, ratios = [], {}, {}
    with tempfile.TemporaryDirectory() as text_folder:
        model = None
        if args.rows & set(UP2_ROWS):
            model = build_up2(args.config, args.device, text_folder, names, args.caption_length)
        models = peers.build_peers(args.rows, args.device)
        for i, size in enumerate(args.sizes):
            for precision in args.precision:
                where = f"{size[0]}x{size[1]}"
                print(f"{where} {precision}:", flush=True)
                new = []
                if model is not None:
                    model.inference_amp = PRECISIONS[precision]  # what TEST.AMP sets
                    new += up2_rows(model, size, precision, args, names, first_size=i == 0)
                    if args.profile:
                        inputs = [{"image": random_image(*size, seed=sum(size)), "height": size[0], "width": size[1]}]
                        profiles[f"{where} {precision}"] = profiling.profile_up2(
                            model, "SPEED_SEG", inputs, args.device, args.repeats)
                    if args.paired and models:
                        ratios[f"{where} {precision}"] = paired(model, models, size, precision, args)
                new += peer_rows(models, size, precision, args)
                rows += [dict(r, size=where, precision=precision) for r in new]
    headers, body = table(rows)
    print("\n" + tabulate(body, headers=headers, tablefmt="github"))
    for where, by_peer in ratios.items():
        print(f"paired, {where}: up2 det+seg / " + ", ".join(f"{peers.LABELS[k]} {v:.2f}" for k, v in by_peer.items()))
    if profiles:
        headers, body = profiling.profile_table(profiles)
        print("\n" + tabulate(body, headers=headers, tablefmt="github"))
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
            "config": os.path.relpath(os.path.abspath(args.config), REPO), "elapsed_s": time.perf_counter() - start}
    os.makedirs(args.output, exist_ok=True)
    write_json_atomic({"meta": meta, "rows": rows, "paired": ratios, "profile": profiles},
                      os.path.join(args.output, "speed.json"))
    print(f"\nwrote {os.path.join(args.output, 'speed.json')} ({meta['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
