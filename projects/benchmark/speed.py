#!/usr/bin/env python
"""Per-task speed of up2 R50 next to detectron2 Mask R-CNN and HF Mask2Former, in one run.

    .venv/bin/python projects/benchmark/speed.py                       # CPU, 800x1067 and 512x683
    .venv/bin/python projects/benchmark/speed.py --sizes 512x683 --repeats 1 --profile
    .venv/bin/python projects/benchmark/speed.py --device cuda --repeats 10

Every model has random weights (nothing can be downloaded), batch 1 unless stated, eval mode,
``torch.inference_mode``. Each row: ``--warmup`` untimed calls, then the median of ``--repeats``
timed calls (seconds per image). Columns:

* ratios to Mask R-CNN R50-FPN and to Mask2Former R50 at the same input size;
* GFLOPs by fvcore's ``FlopCountAnalysis`` (fvcore counts one multiply-add as one flop; ops it
  has no handle for, e.g. ``grid_sample`` inside deformable attention, count 0 and are listed in
  the JSON), achieved GFLOP/s = 2 x fvcore count / time, and its share of a fp32 GEMM peak the
  script measures (2 n^3 / t of a square matmul);
* peak memory: CPU = peak resident set size above the resident size just before the call (after
  ``malloc_trim``), sampled every 5 ms from /proc/self/statm; CUDA = max_memory_allocated delta.

Set-ups that keep the comparison fair with random weights: Mask R-CNN keeps its top 100 boxes
(``SCORE_THRESH_TEST 0``) so its mask head runs on 100 boxes as up2's 100 outputs do; Mask2Former
(80 classes, 100 queries) includes ``post_process_instance_segmentation`` with threshold 0.
up2 is ``--config``'s architecture (default configs/up2_R50.yaml) with its tasks replaced by
instance segmentation, classification, captioning and retrieval (tasks hold no weights). Its
text encoder is roberta-base's architecture with random weights and a byte-level BPE tokenizer
of roberta-base's size (50,265 tokens, its special ids; merges trained on the class names so
names get realistic token counts), so the "full" captioning vocabulary has roberta-base's size.
Greedy captioning masks the end token (a forward hook on the likelihood, this row only) so that
random weights decode exactly ``--caption-length`` tokens. The image-only forward and the
classification row are timed interleaved; their ratio is the median of paired ratios. The
first size's classification and captioning first calls are the uncached ones (target set
embedded); later sizes reuse the cache. ``--profile`` adds each component's share of the up2
detection+segmentation time, measured by forward hooks on the submodules (no model code
changed). Writes ``speed.json`` and ``speed.md`` to ``--output``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROBERTA_BASE_VOCAB = 50265
UP2_ROWS = ("det", "det-nchw", "image", "cls", "caption", "retrieval")
PEER_ROWS = ("maskrcnn", "mask2former")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def autocast(device: str, precision: str):
    """Autocast context of one precision ("fp32": disabled)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.split(":")[0], dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# ---------------------------------------------------------------------------------- set-up
def parse_sizes(text: str):
    """'800x1067,512x683' -> [(800, 1067), (512, 683)] (height x width, pixels)."""
    sizes = []
    for part in text.split(","):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--sizes: expected HxW[,HxW...], got {part!r}") from None
        if h < 32 or w < 32:
            raise argparse.ArgumentTypeError(f"--sizes: {part!r} is smaller than 32 px")
        sizes.append((h, w))
    return sizes


def write_random_roberta_base(folder: str, corpus, vocab_size: int = ROBERTA_BASE_VOCAB) -> None:
    """roberta-base's architecture with random weights, and a byte-level BPE tokenizer with
    roberta-base's size and special ids (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last): merges
    trained on ``corpus`` (so its words get realistic token counts), then two-symbol merges
    appended until the vocabulary has ``vocab_size`` tokens."""
    from tokenizers import ByteLevelBPETokenizer, pre_tokenizers
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size - 1, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    vocab = dict(sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]))
    bpe.save_model(folder)
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line.strip()]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pairs = ((a, b) for a in alphabet for b in alphabet if a + b not in vocab)
    while len(vocab) < vocab_size - 1:
        a, b = next(pairs)
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    vocab["<mask>"] = len(vocab)
    RobertaTokenizerFast(vocab=vocab, merges=merges).save_pretrained(folder)
    RobertaModel(RobertaConfig(vocab_size=vocab_size)).save_pretrained(folder)


def class_names_1000():
    """1,000 ImageNet class names (torchvision's table), or generated names if it moved."""
    try:
        from torchvision.models._meta import _IMAGENET_CATEGORIES as names
    except ImportError:
        names = [f"object category {i}" for i in range(1000)]
    return list(names)[:1000]


def build_up2(config: str, roberta: str, device: str, caption_vocab: str):
    """The model of ``config`` (architecture keys only) with ``cfg.TASKS`` replaced by the four
    benchmarked tasks on COCO's registered names (tasks hold no weights; no data is read)."""
    from detectron2.config import CfgNode, get_cfg
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    import up2  # noqa: F401
    from up2 import add_up2_config
    from up2.modeling.tasks import resolve_task_data

    if caption_vocab == "dataset" and "speed_caption_texts" not in DatasetCatalog.list():
        texts = [f"a photo of a {n}" for n in class_names_1000()]
        DatasetCatalog.register("speed_caption_texts", lambda: [{"captions": texts}])
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(config)
    cfg.MODEL.TEXT_ENCODER.NAME = roberta
    cfg.MODEL.DEVICE = device
    coco = {"TRAIN": ["coco_2017_train"], "TEST": ["coco_2017_val"]}
    cap = {"TRAIN": ["speed_caption_texts"]} if caption_vocab == "dataset" else coco
    cfg.TASKS = CfgNode({
        "SPEED_SEG": {"TYPE": "instance_segmentation", "DATASETS": coco},
        "SPEED_CLS": {"TYPE": "classification", "DATASETS": coco},
        "SPEED_CAP": {"TYPE": "captioning", "DATASETS": cap, "VOCABULARY": caption_vocab, "BEAM_SIZE": 1,
                      "MAX_CAPTION_LENGTH": 20},
        "SPEED_RET": {"TYPE": "retrieval", "DATASETS": coco},
    })
    cfg = resolve_task_data(cfg)  # COCO's class names from detectron2's metadata; the caption vocabulary
    cfg.freeze()
    torch.manual_seed(0)
    from up2.modeling.inference import prepare_for_inference

    return prepare_for_inference(build_model(cfg)), cfg  # eval + the inference rewrites, as the predictors


def build_mask_rcnn(device: str):
    """detectron2 model zoo Mask R-CNN R50-FPN 3x config, random weights, top-100 outputs."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep 100 boxes so the mask head runs
    torch.manual_seed(0)
    return build_model(cfg).eval()


class Mask2FormerCall(nn.Module):
    """HF Mask2FormerForUniversalSegmentation (ResNet-50, 80 classes, 100 queries) + its instance
    post-processing. forward(pixel_values (1, 3, H, W) float) -> per-image results list."""

    def __init__(self, device: str):
        super().__init__()
        from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                                  ResNetConfig)

        backbone = ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck",
                                out_features=["stage1", "stage2", "stage3", "stage4"])
        config = Mask2FormerConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                                   num_labels=80, num_queries=100)
        torch.manual_seed(0)
        self.model = Mask2FormerForUniversalSegmentation(config).to(device).eval()
        self.processor = Mask2FormerImageProcessor()

    def forward(self, pixel_values: torch.Tensor, postprocess: bool = True):
        out = self.model(pixel_values=pixel_values)
        if not postprocess:  # tensors only (for fvcore tracing)
            return out.class_queries_logits, out.masks_queries_logits
        size = [tuple(pixel_values.shape[-2:])] * pixel_values.shape[0]
        return self.processor.post_process_instance_segmentation(out, threshold=0.0, target_sizes=size)


# ---------------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_memory(device: str, box: list):
    """Appends the call's peak memory in MiB to ``box`` (module docstring: what is measured)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        box.append((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    if not os.path.exists("/proc/self/statm"):  # no sampler: lifetime peak (an upper bound of the process)
        yield
        box.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return
    _malloc_trim()
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        box.append((max(peak[0], _rss_bytes()) - base) / 2**20)


def measure(fns, device: str, warmups, repeats: int) -> list:
    """Time callables: each its own untimed warm-up calls first, then ``repeats`` rounds in
    which every callable runs once (interleaved, so that load drifting on a shared machine
    hits them alike).

    Args:
        fns: list of callables. warmups: untimed calls per callable (list, same length).

    Returns:
        per callable {"first_s": its first call (s), "times_s": timed calls, "median_s",
        "peak_mib": max over the timed calls, "first_peak_mib": the first call's}.
    """
    times = [[] for _ in fns]
    mem = [[] for _ in fns]
    first = [None] * len(fns)

    def call(i):
        with peak_memory(device, mem[i]):
            _sync(device)
            t0 = time.perf_counter()
            fns[i]()
            _sync(device)
            dt = time.perf_counter() - t0
        first[i] = dt if first[i] is None else first[i]
        return dt

    for i, n in enumerate(warmups):
        for _ in range(n):
            call(i)
    for _ in range(repeats):
        for i in range(len(fns)):
            times[i].append(call(i))
    return [{"first_s": first[i], "times_s": times[i], "median_s": statistics.median(times[i]),
             "peak_mib": max(mem[i][warmups[i]:]), "first_peak_mib": mem[i][0]} for i in range(len(fns))]


def gemm_peak(device: str, n: int, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """GEMM GFLOP/s in ``dtype``: best of ``repeats`` (n x n) @ (n x n) products, 2 n^3 flops each."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


class Call(nn.Module):
    """A module whose forward calls ``fn(*inputs)``, for fvcore / detectron2 tracing."""

    def __init__(self, owner: nn.Module, fn):
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(*inputs)


def _sdpa_flops(inputs, outputs) -> int:
    """aten::scaled_dot_product_attention: q (..., L, E), k (..., S, E), v (..., S, Ev) ->
    L*S*E (q k^T) + L*S*Ev (weights @ v) multiply-adds per batch/head."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = 1
    for n in q[:-2]:
        batch *= n
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _baddbmm_flops(inputs, outputs) -> int:
    """aten::baddbmm(input, b1 (B, n, m), b2 (B, m, p)) -> B*n*m*p multiply-adds."""
    from fvcore.nn.jit_handles import get_shape

    (b, n, m), p = get_shape(inputs[1]), get_shape(inputs[2])[-1]
    return b * n * m * p


def _msda_flops(inputs, outputs) -> int:
    """up2's compiled MSDA op (a traced PythonOp): value (N, S, M, D), sampling locations
    (N, Q, M, L, P, 2) -> 4 multiply-adds per sampled channel, as fvcore counts the bilinear
    ``grid_sample`` of the pure-PyTorch path."""
    from fvcore.nn.jit_handles import get_shape

    shapes = [s for s in (get_shape(x) for x in inputs) if s is not None]
    value = next(s for s in shapes if len(s) == 4)
    loc = next(s for s in shapes if len(s) == 6)
    n = 1
    for k in loc[:-1]:
        n *= k
    return 4 * n * value[-1]


def count_flops(module: nn.Module, inputs: tuple, detectron2_style: bool) -> dict:
    """fvcore FlopCountAnalysis (detectron2's wrapper for list-of-dict models), with handles
    added for scaled_dot_product_attention, baddbmm and up2's compiled MSDA op. Returns
    {"gflops": total / 1e9 (multiply-adds), "unsupported": {op: count}, "counter": "fvcore"}
    or {"error": str}."""
    from fvcore.nn import FlopCountAnalysis as FvcoreFlops
    from detectron2.utils.analysis import FlopCountAnalysis as D2Flops

    try:
        with torch.no_grad():
            flops = D2Flops(module, inputs[0]) if detectron2_style else FvcoreFlops(module, inputs)
            flops.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flops, "aten::baddbmm", _baddbmm_flops,
                                "prim::PythonOp._CompiledMSDA", _msda_flops)
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            total = flops.total()
            return {"gflops": total / 1e9, "unsupported": dict(flops.unsupported_ops()), "counter": "fvcore"}
    except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError) as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}


def count_flops_dispatch(model: nn.Module, fn) -> dict:
    """Multiply-adds of ``fn()`` by torch.utils.flop_counter (dispatch level; for calls whose
    outputs leave the traced graph, e.g. generated token ids). It reports 2 flops per
    multiply-add; halved here to fvcore's convention. ``model``'s parameters are set not to
    require grad while counting (its module tracker hooks tensors that do), then restored."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    needs = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in needs:
            p.requires_grad_(False)
        with torch.no_grad(), counter:
            fn()
    finally:
        for p in needs:
            p.requires_grad_(True)
    return {"gflops": counter.get_total_flops() / 2e9, "unsupported": {}, "counter": "torch.utils.flop_counter"}


class ComponentTimer:
    """Wall time per component through forward hooks (or wrapped methods). Partition components
    count only when no other partition component is running (the outermost wins), so they add
    up to at most the total; "sub" components (MSDA) are counted wherever they run."""

    def __init__(self, device: str):
        self.device = device
        self.totals = defaultdict(float)
        self.active = None
        self.handles = []
        self.restore = []

    def _enter(self, name, sub):
        if sub or self.active is None:
            _sync(self.device)
            if not sub:
                self.active = name
            return time.perf_counter()
        return None

    def _exit(self, name, sub, t0):
        if t0 is None:
            return
        _sync(self.device)
        self.totals[name] += time.perf_counter() - t0
        if not sub:
            self.active = None

    def module(self, name: str, module: nn.Module, sub: bool = False) -> None:
        stack = []
        self.handles.append(module.register_forward_pre_hook(lambda m, a: stack.append(self._enter(name, sub))))
        self.handles.append(module.register_forward_hook(lambda m, a, o: self._exit(name, sub, stack.pop())))

    def method(self, name: str, obj, attr: str) -> None:
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = self._enter(name, False)
            try:
                return original(*args, **kwargs)
            finally:
                self._exit(name, False, t0)

        setattr(obj, attr, timed)
        self.restore.append((obj, attr))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for obj, attr in self.restore:
            delattr(obj, attr)  # the instance attribute shadowed the class method


PROFILE_ORDER = ("backbone", "pixel decoder", "  of which MSDA (pixel decoder)", "proposal decoder",
                 "  of which MSDA (proposal decoder)", "image tokens", "text encoder + g on class names (target set)",
                 "unified decoder", "post-processing")


def profile_up2(model, task: str, inputs, device: str, repeats: int, cold: bool) -> dict:
    """Seconds per call of each component of up2 detection+segmentation (mean of ``repeats``
    calls with the class-name targets cached) and, when ``cold``, one first call before that
    (the model's target cache must not hold the task's class names yet)."""
    from up2.layers.ms_deform_attn import MSDeformAttn

    def run(n):
        timer = ComponentTimer(device)
        net = model.proposal_network
        timer.module(PROFILE_ORDER[0], model.backbone)
        timer.module(PROFILE_ORDER[1], net.pixel_decoder)
        timer.module(PROFILE_ORDER[3], net.decoder)
        timer.module(PROFILE_ORDER[5], model.image_encoder)
        timer.method(PROFILE_ORDER[6], model, "embed_targets")
        timer.module(PROFILE_ORDER[7], model.unified_decoder)
        timer.method(PROFILE_ORDER[8], model.tasks[task], "postprocess")
        for name, part in ((PROFILE_ORDER[2], net.pixel_decoder), (PROFILE_ORDER[4], net.decoder)):
            for m in part.modules():
                if isinstance(m, MSDeformAttn):
                    timer.module(name, m, sub=True)
        total = 0.0
        try:
            for _ in range(n):
                _sync(device)
                t0 = time.perf_counter()
                model(inputs, task=task)
                _sync(device)
                total += time.perf_counter() - t0
        finally:
            timer.close()
        parts = {k: timer.totals.get(k, 0.0) / n for k in PROFILE_ORDER}
        top = sum(v for k, v in parts.items() if not k.startswith("  "))
        parts["other (preprocess, likelihood, gathers)"] = max(total / n - top, 0.0)
        return total / n, parts

    out = {}
    with torch.inference_mode():
        if cold:
            first_total, first = run(1)
            out.update(first_call_total_s=first_total, first_call_target_set_s=first[PROFILE_ORDER[6]])
        else:
            model(inputs, task=task)  # warm-up
        out["total_s"], out["components_s"] = run(repeats)
    return out


# ---------------------------------------------------------------------------------- rows
@contextlib.contextmanager
def inference_precision(model, precision: str):
    """up2 forwards at ``precision`` inside the block (the model's ``inference_amp``, i.e.
    cfg.TEST.AMP: autocast, results in float32); a no-op without a model."""
    if model is None:
        yield
        return
    previous = model.inference_amp
    model.inference_amp = PRECISIONS[precision]
    try:
        yield
    finally:
        model.inference_amp = previous


@contextlib.contextmanager
def memory_format(model, channels_last: bool):
    """up2's backbone and proposal network (and the batches it pads) in NHWC (True) or NCHW
    (False) inside the block, as cfg.MODEL.CHANNELS_LAST would build them; restored after."""
    def apply(on: bool) -> None:
        fmt = torch.channels_last if on else torch.contiguous_format
        model.channels_last = on
        model.backbone.to(memory_format=fmt)
        model.proposal_network.to(memory_format=fmt)

    previous = model.channels_last
    apply(channels_last)
    try:
        yield
    finally:
        apply(previous)


def up2_rows(model, seg_task: str, size, args, names, first_size: bool, precision: str = "fp32") -> list:
    """Timed rows of up2 at one input size; call it inside ``inference_precision(model,
    precision)``. At the first size the classification and captioning target sets of this
    precision are not cached yet, so their first calls are the uncached ones. fvcore counts
    only at fp32 (the table reuses them for bf16 rows)."""
    from up2.modeling.token_attributes import TaskFamily
    from up2.modeling.unified_decoder import SPE_POSITION

    h, w = size
    g = torch.Generator().manual_seed(h * 10000 + w)
    img = lambda: {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g), "height": h, "width": w}  # noqa: E731
    one = [img()]
    batch = [img() for _ in range(args.retrieval_batch)]
    cap = model.tasks["SPEED_CAP"]
    vocab_size = len(cap.vocabulary(model.text_encoder).resolve(model.text_encoder))

    def image_only(inputs, family=TaskFamily.CLASSIFICATION):
        with model.inference_autocast():
            enc = model.encode_image(inputs, family)
            return model.unified_decoder(enc.tokens.batch, outputs=SPE_POSITION)  # what classification reads

    last_caption = []

    def caption():
        last_caption[:] = model(one, task="SPEED_CAP", beam_size=1, max_length=args.caption_length)

    rows = []
    count = args.flops and precision == "fp32"

    def finish(key, label, r, flop_fn=None, per=1, flops=None):
        r.update(model="up2", key=key, label=label, size=f"{h}x{w}", s_per_img=r["median_s"] / per, batch=per,
                 precision=precision)
        if flops is not None:
            r["flops"] = flops
        elif count and flop_fn is not None:
            r["flops"] = count_flops(Call(model, flop_fn), (one,), True)
        rows.append(r)
        return r

    def add(key, label, fn, flop_fn=None, per=1, warmup=None, flops=None):
        if key.split(":")[0] not in args.rows:
            return None
        print(f"  {label} ...", flush=True)
        with torch.inference_mode():
            r = measure([fn], args.device, [args.warmup if warmup is None else warmup], args.repeats)[0]
        return finish(key, label, r, flop_fn, per, flops)

    config = os.path.splitext(os.path.basename(args.config))[0]
    add("det", f"up2 detection+segmentation (80 COCO names, cached; {config})",
        lambda: model(one, task=seg_task), lambda x: model(x, task=seg_task))
    if "det-nchw" in args.rows and not model.channels_last:
        print("  det-nchw: skipped, the config already builds NCHW convs (MODEL.CHANNELS_LAST False)", flush=True)
    elif "det-nchw" in args.rows:  # the same model with NCHW convs: what MODEL.CHANNELS_LAST gains
        with memory_format(model, channels_last=False):
            add("det-nchw", "the same, NCHW layout (MODEL.CHANNELS_LAST False)", lambda: model(one, task=seg_task))
    # image-only and classification: timed interleaved, the ratio is the median of paired ratios
    pair = {"image": ("up2 image-only forward (f_image + g up to [SPE], no heads)", lambda: image_only(one), image_only,
                      args.warmup),
            "cls": (f"up2 classification, {len(names)} names (cached)",
                    lambda: model(one, task="SPEED_CLS", class_names=names),
                    lambda x: model(x, task="SPEED_CLS", class_names=names), max(args.warmup, 1))}
    pair = {k: v for k, v in pair.items() if k in args.rows}
    if pair:
        print("  " + " | ".join(v[0] for v in pair.values()) + " (interleaved) ...", flush=True)
        with torch.inference_mode():
            res = measure([v[1] for v in pair.values()], args.device, [v[3] for v in pair.values()], args.repeats)
        out = {k: finish(k, v[0], r, v[2]) for (k, v), r in zip(pair.items(), res)}
        cls = out.get("cls")
        if "image" in out and cls is not None:
            cls["ratio_to_image_only"] = statistics.median(
                c / i for c, i in zip(cls["times_s"], out["image"]["times_s"]))
        if cls is not None and first_size:
            rows.append({k: v for k, v in cls.items() if k not in ("flops", "ratio_to_image_only")})
            rows[-1].update(key="cls:first", label=f"up2 classification, {len(names)} names (first call, uncached)",
                            s_per_img=cls["first_s"], median_s=cls["first_s"], times_s=[cls["first_s"]],
                            peak_mib=cls["first_peak_mib"])
    if "caption" in args.rows:
        # Random weights pick the end token early at random; to time a fixed amount of work, a
        # forward hook on the likelihood masks the end and padding targets while this row runs.
        te = model.text_encoder
        ends = cap.vocabulary(te).index_of(torch.tensor([te.special_ids.sep, te.special_ids.pad]), te)
        ends = ends[ends >= 0].to(model.device)

        def no_end(module, inputs, logits):
            return logits.index_fill(-1, ends, float("-inf"))

        hook = model.likelihood.register_forward_hook(no_end)
        try:
            c = add("caption", f"up2 greedy captioning (beam 1, {args.caption_length} tokens, vocabulary "
                    f"{args.caption_vocab}: {vocab_size:,} tokens)", caption, warmup=max(args.warmup, 1))
            c["generated_tokens"] = len(last_caption[0]["caption_ids"])
            if count:
                c["flops"] = count_flops_dispatch(model, caption)
        finally:
            hook.remove()
    single = add("retrieval", "up2 retrieval image embedding (batch 1)",
                 lambda: image_only(one, TaskFamily.RETRIEVAL)[:, 0],
                 lambda x: image_only(x, TaskFamily.RETRIEVAL)[:, 0])
    add("retrieval:batch", f"up2 retrieval image embedding (batch {args.retrieval_batch}, s per image)",
        lambda: image_only(batch, TaskFamily.RETRIEVAL)[:, 0], per=len(batch), warmup=0,
        flops=(single or {}).get("flops"))
    return rows


def _peer_call(key: str, model, x: torch.Tensor, device: str):
    """``(call, inputs)``: a no-argument call of a peer on the uint8 image ``x`` (3, h, w) and the
    input it passes: detectron2 dicts for Mask R-CNN, (1, 3, h, w) normalised pixels for
    Mask2Former."""
    h, w = x.shape[-2:]
    if key == "maskrcnn":
        inputs = [{"image": x.float().to(device), "height": h, "width": w}]
    else:
        inputs = ((x.float() / 255 - 0.45) / 0.225)[None].to(device)
    return (lambda: model(inputs)), inputs


def paired_ratios(model, seg_task: str, peers: dict, size, args, precision: str) -> dict:
    """up2 det+seg and each peer timed round-robin (``args.paired`` rounds after one warm-up
    each) on the same image; per peer the median over rounds of (up2 s / peer s). Pairing the
    calls of one round cancels most of the load drift of a shared machine, which moves
    separately measured rows by +-25 % here. With the det-nchw row selected, a copy of the model
    with NCHW convs joins the rounds (key "det-nchw"). Call it inside ``inference_precision``."""
    h, w = size
    x = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h + w))
    one = [{"image": x, "height": h, "width": w}]
    keys = [k for k, (_, m, _) in peers.items() if m is not None]
    calls = [_peer_call(k, peers[k][1], x, args.device)[0] for k in keys]

    def under_autocast(fn):
        def run():
            with autocast(args.device, precision):
                fn()
        return run

    fns = [lambda: model(one, task=seg_task)] + [under_autocast(c) for c in calls]
    nchw = None
    if "det-nchw" in args.rows and model.channels_last:  # an NCHW copy joins the rounds (same weights, cache)
        nchw = copy.deepcopy(model)
        nchw.channels_last = False
        nchw.backbone.to(memory_format=torch.contiguous_format)
        nchw.proposal_network.to(memory_format=torch.contiguous_format)
        keys.append("det-nchw")
        fns.append(lambda: nchw(one, task=seg_task))
    if not keys:
        print("  paired: nothing to pair up2 det+seg with (no peer ran, no det-nchw row); skipped", flush=True)
        return {}
    print(f"  paired: up2 det+seg vs {', '.join(keys)} ({args.paired} rounds) ...", flush=True)
    with torch.inference_mode():
        res = measure(fns, args.device, [1] * len(fns), args.paired)
    del nchw
    up2_times = res[0]["times_s"]
    return {k: {"ratio": statistics.median(a / b for a, b in zip(up2_times, r["times_s"])),
                "up2_median_s": res[0]["median_s"], "peer_median_s": r["median_s"]}
            for k, r in zip(keys, res[1:])}


def peer_rows(peers: dict, size, args, precision: str = "fp32") -> list:
    """Timed rows of the peers at one size, under autocast for bf16 (fvcore counts at fp32 only)."""
    h, w = size
    rows = []
    x = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h + w))
    for key, (label, model, note) in peers.items():
        if model is None:
            rows.append({"model": key, "key": key, "label": label, "size": f"{h}x{w}", "s_per_img": None, "note": note,
                         "precision": precision})
            continue
        print(f"  {label} ...", flush=True)
        fn, inputs = _peer_call(key, model, x, args.device)
        if key == "maskrcnn":
            flop_fn, d2 = (lambda i: model(i)), True
        else:
            flop_fn, d2 = (lambda p: model(p, postprocess=False)), False
        flop_inputs = (inputs,)
        try:
            with torch.inference_mode(), autocast(args.device, precision):
                r = measure([fn], args.device, [args.warmup], args.repeats)[0]
        except RuntimeError as e:  # e.g. an op without a kernel for this dtype
            rows.append({"model": key, "key": key, "label": label, "size": f"{h}x{w}", "s_per_img": None,
                         "note": f"could not run in {precision}: {e}".splitlines()[0], "precision": precision})
            continue
        r.update(model=key, key=key, label=label, size=f"{h}x{w}", s_per_img=r["median_s"], batch=1, note=note,
                 precision=precision)
        if args.flops and precision == "fp32":
            r["flops"] = count_flops(Call(model, flop_fn), flop_inputs, d2)
        rows.append(r)
    return rows


def build_peers(args) -> dict:
    peers = {}
    if "maskrcnn" in args.rows:
        label = "detectron2 Mask R-CNN R50-FPN (random weights)"
        try:
            peers["maskrcnn"] = (label, build_mask_rcnn(args.device), "ROIAlign/NMS from torchvision")
        except (ImportError, RuntimeError, KeyError, FileNotFoundError) as e:
            peers["maskrcnn"] = (label, None, f"could not run: {type(e).__name__}: {e}")
    if "mask2former" in args.rows:
        label = "HF Mask2Former R50 (random weights)"
        try:
            peers["mask2former"] = (label, Mask2FormerCall(args.device), "incl. post_process_instance_segmentation")
        except (ImportError, RuntimeError, ValueError, TypeError) as e:
            peers["mask2former"] = (label, None, f"could not run: {type(e).__name__}: {e}")
    return peers


# ---------------------------------------------------------------------------------- report
def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def table(rows, peaks: dict):
    """Rows as a list of lists + headers (see the module docstring for the columns). Ratios
    compare with the peer at the same size and precision; ``peaks``: GEMM GFLOP/s per precision."""
    by = {(r["key"], r["size"], r.get("precision", "fp32")): r for r in rows}
    headers = ["size", "precision", "task / model", "s/img", "/Mask R-CNN", "/Mask2Former", "GFLOPs", "GFLOP/s",
               "% GEMM peak", "peak MiB"]
    out = []
    for r in rows:
        s, prec = r.get("s_per_img"), r.get("precision", "fp32")
        ratios = []
        for peer in PEER_ROWS:
            p = by.get((peer, r["size"], prec), {}).get("s_per_img")
            ratios.append(s / p if (s and p) else None)
        f = r.get("flops") or by.get((r["key"], r["size"], "fp32"), {}).get("flops") or {}
        gf = f.get("gflops")
        rate = 2 * gf / s if (gf and s) else None
        peak = peaks.get(prec)
        label = r["label"] + (f" [{r['note']}]" if r.get("note") and s is None else "")
        out.append([r["size"], prec, label, _fmt(s, ".3f"), _fmt(ratios[0], ".2f"), _fmt(ratios[1], ".2f"),
                    _fmt(gf, ".1f") if "error" not in f else "trace failed", _fmt(rate, ".1f"),
                    _fmt(rate / peak * 100 if (rate and peak) else None, ".0f"), _fmt(r.get("peak_mib"), ".0f")])
    return headers, out


def profile_table(profiles: dict):
    rows = []
    for size, p in profiles.items():
        for name, secs in p["components_s"].items():
            rows.append([size, name, f"{secs:.3f}", f"{100 * secs / p['total_s']:.1f}%"])
        rows.append([size, "total (det+seg, class names cached)", f"{p['total_s']:.3f}", "100%"])
        if "first_call_total_s" in p:
            rows.append([size, "first call (class names not cached): total / target set",
                         f"{p['first_call_total_s']:.3f} / {p['first_call_target_set_s']:.3f}", ""])
    return ["size", "component", "s/img", "share"], rows


def msda_path(device: str) -> str:
    """Which multi-scale deformable attention path runs, from up2.layers.ms_deform_attn's own
    check: the compiled kernel serves CPU tensors when built, unless the path is forced."""
    from up2.layers import ms_deform_attn as msda

    fast = msda.fast_path_available()
    env_name = getattr(msda, "PATH_ENV", "UP2_MSDA_PATH")
    forced = os.environ.get(env_name, "auto")
    runs = "compiled" if (fast and device == "cpu" and forced != "pytorch") else "pytorch"
    return f"{runs} (fast_path_available()={fast}, {env_name}={forced})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("800x1067,512x683"), help="HxW[,HxW...]")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per row before timing")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--rows", default=",".join(UP2_ROWS + PEER_ROWS),
                        help=f"comma list from {','.join(UP2_ROWS + PEER_ROWS)}")
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "up2_R50.yaml"))
    parser.add_argument("--caption-vocab", choices=("full", "dataset"), default="full",
                        help="full = all 50,265 tokens; dataset = tokens of 1,000 'a photo of a <class>' texts")
    parser.add_argument("--caption-length", type=int, default=20)
    parser.add_argument("--retrieval-batch", type=int, default=8)
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip fvcore counting")
    parser.add_argument("--precision", default="fp32,bf16",
                        help="comma list from fp32,bf16: every row runs at each (bf16 = autocast, results float32)")
    parser.add_argument("--profile", action="store_true", help="component shares of up2 det+seg")
    parser.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                        help="also time up2 det+seg and the peers round-robin for ROUNDS rounds and report the "
                             "median per-round ratio (robust to load drift); 0 = off")
    parser.add_argument("--output", default=os.path.join(REPO, "output", "benchmark"))
    args = parser.parse_args(argv)
    args.rows = set(args.rows.split(","))
    unknown = args.rows - set(UP2_ROWS + PEER_ROWS)
    if unknown:
        parser.error(f"--rows: unknown {sorted(unknown)}; choose from {UP2_ROWS + PEER_ROWS}")
    args.precision = list(dict.fromkeys(p.strip() for p in args.precision.split(",") if p.strip()))
    if not args.precision or set(args.precision) - set(PRECISIONS):
        parser.error(f"--precision: choose one or more of {sorted(PRECISIONS)}, got {args.precision}")
    if args.repeats < 1 or args.warmup < 0 or args.paired < 0:
        parser.error("--repeats must be >= 1, --warmup >= 0 and --paired >= 0")
    if args.paired and "det" not in args.rows:
        parser.error("--paired times up2 det+seg against the peers: add det to --rows")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    from tabulate import tabulate

    from up2.utils import write_json_atomic
    from up2.utils.atomic import atomic_write

    start = time.perf_counter()
    import detectron2

    d2_compiled = True
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        d2_compiled = False
    meta = {
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "repeats": args.repeats, "warmup": args.warmup,
        "msda": msda_path(args.device), "detectron2": f"{detectron2.__version__}, compiled _C: {d2_compiled}",
        "memory": "CUDA max_memory_allocated delta" if args.device.startswith("cuda") else
        "peak RSS above pre-call RSS (malloc_trim first), /proc/self/statm sampled every 5 ms",
    }
    gemm_n = 4096 if args.device.startswith("cuda") else 2048
    meta["precision"] = args.precision
    meta["gemm_peak_gflops"] = {p: gemm_peak(args.device, gemm_n, dtype=PRECISIONS[p] or torch.float32)
                                for p in args.precision}
    print(f"MSDA: {meta['msda']}; detectron2 {meta['detectron2']}; threads {meta['threads']}; GEMM peak "
          + ", ".join(f"{p} {v:.0f}" for p, v in meta["gemm_peak_gflops"].items()) + " GFLOP/s", flush=True)

    names = class_names_1000()
    rows, profiles, paired = [], {}, {}
    with tempfile.TemporaryDirectory() as roberta:
        model = seg_task = None
        if args.rows & set(UP2_ROWS) or args.profile:
            write_random_roberta_base(roberta, names + [f"a photo of a {n}" for n in names])
            model, up2_cfg = build_up2(args.config, roberta, args.device, args.caption_vocab)
            seg_task = "SPEED_SEG"
            meta["up2"] = {"config": os.path.relpath(args.config, REPO),
                           "moe": bool(up2_cfg.MODEL.UNIFIED_DECODER.MOE.ENABLED),
                           "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
            print(f"up2: {meta['up2']}", flush=True)
        peers = build_peers(args)
        for i, size in enumerate(args.sizes):
            for precision in args.precision:
                print(f"size {size[0]}x{size[1]}, {precision}:", flush=True)
                with inference_precision(model, precision):
                    if args.profile:  # first, so that at the first size the class names are not cached yet
                        g = torch.Generator().manual_seed(size[0] + size[1])
                        inputs = [{"image": torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=g),
                                   "height": size[0], "width": size[1]}]
                        print("  profile of up2 detection+segmentation ...", flush=True)
                        try:
                            profiles[f"{size[0]}x{size[1]} {precision}"] = profile_up2(
                                model, seg_task, inputs, args.device, args.repeats, i == 0)
                        except (RuntimeError, ValueError) as e:
                            print(f"  profile failed: {e}", flush=True)
                    if args.rows & set(UP2_ROWS):
                        try:
                            rows += up2_rows(model, seg_task, size, args, names, i == 0, precision)
                        except (RuntimeError, ValueError) as e:  # e.g. an input too small for the query count
                            print(f"  up2 failed: {e}", flush=True)
                            rows.append({"model": "up2", "key": "up2:error", "label": "up2",
                                         "size": f"{size[0]}x{size[1]}", "precision": precision, "s_per_img": None,
                                         "note": f"could not run: {type(e).__name__}: {e}"})
                rows += peer_rows(peers, size, args, precision)
                if args.paired and model is not None and "det" in args.rows:
                    with inference_precision(model, precision):
                        ratios = paired_ratios(model, seg_task, peers, size, args, precision)
                        if ratios:
                            paired[f"{size[0]}x{size[1]} {precision}"] = ratios

    elapsed = time.perf_counter() - start
    meta["elapsed_s"] = elapsed
    headers, body = table(rows, meta["gemm_peak_gflops"])
    notes = [f"Device {meta['device']} ({meta['cores']} cores, {meta['threads']} torch threads), "
             f"torch {meta['torch']}; "
             f"median of {args.repeats} after {args.warmup} warm-up; random weights; batch 1 unless stated.",
             f"MSDA path: {meta['msda']}. detectron2 {meta['detectron2']}.",
             "GFLOPs: fvcore FlopCountAnalysis, 1 multiply-add = 1 flop, with handles added for "
             "scaled_dot_product_attention, baddbmm and the compiled MSDA op; ops without a handle count 0 "
             "(listed per row in speed.json: mostly elementwise; torchvision::roi_align in Mask R-CNN); MSDA "
             "(grid_sample or compiled) counts 4 per sampled channel. "
             "Captioning: torch.utils.flop_counter (its generated ids leave the traced graph). Mask2Former: model "
             "only, not its post-processing. Retrieval batch: the batch-1 count per image.",
             f"GFLOP/s = 2 x GFLOPs / (s/img) (bf16 rows: the fp32 count); % GEMM peak against a {gemm_n}^2 "
             f"matmul of the row's precision measured in this run: "
             + ", ".join(f"{p} {v:.0f}" for p, v in meta["gemm_peak_gflops"].items()) + " GFLOP/s.",
             "Precision bf16: torch.autocast(bfloat16) around every call (up2: cfg.TEST.AMP, results cast back "
             "to float32); ratios compare with the peer at the same precision.",
             f"Memory: {meta['memory']}.", f"Whole run: {elapsed:.0f} s."]
    for cls in (r for r in rows if r["key"] == "cls" and "ratio_to_image_only" in r):
        notes.append(f"Classification over {len(names)} names (cached) / image-only forward, {cls['size']} "
                     f"{cls['precision']}: {cls['ratio_to_image_only']:.3f} (median of paired, interleaved calls; "
                     "target <= 1.05).")
    by = {(r["key"], r["size"], r.get("precision")): r.get("s_per_img") for r in rows}
    for size in {r["size"] for r in rows}:
        det, peer = by.get(("det", size, "bf16")), by.get(("maskrcnn", size, "fp32"))
        if det and peer:
            notes.append(f"{size}: up2 det+seg in bf16 / Mask R-CNN in fp32 (its default): {det / peer:.2f}; "
                         f"/ Mask2Former fp32: "
                         + _fmt(det / by[("mask2former", size, "fp32")] if by.get(("mask2former", size, "fp32"))
                                else None, ".2f") + ".")
    for r in (r for r in rows if r["key"] == "det-nchw" and r.get("s_per_img")):
        cl = by.get(("det", r["size"], r.get("precision")))
        if cl:
            notes.append(f"{r['size']} {r['precision']}: up2 det+seg NCHW / channels-last (MODEL.CHANNELS_LAST): "
                         f"{r['s_per_img'] / cl:.2f}.")
    for where, ratios in paired.items():
        name = lambda k: "up2 NCHW (CHANNELS_LAST False)" if k == "det-nchw" else peers[k][0].split(" (")[0]  # noqa: E731
        notes.append(f"Paired ({args.paired} round-robin rounds), {where}: up2 det+seg / "
                     + ", ".join(f"{name(k)} {v['ratio']:.2f} (medians {v['up2_median_s']:.2f} s / "
                                 f"{v['peer_median_s']:.2f} s)" for k, v in ratios.items()) + ".")
    cap = next((r for r in rows if r["key"] == "caption"), None)
    if cap:
        notes.append(f"Captioning: {cap['generated_tokens']} tokens per image (end token masked by a hook so that "
                     f"random weights decode the full length); the first call also embeds the vocabulary "
                     f"({cap['first_s']:.1f} s).")
    text = tabulate(body, headers=headers, tablefmt="github")
    print("\n" + text + "\n\n" + "\n".join(notes))
    md = text + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if profiles:
        ph, pb = profile_table(profiles)
        ptext = tabulate(pb, headers=ph, tablefmt="github")
        print("\nProfile of up2 detection+segmentation (forward hooks; mean of the timed calls):\n" + ptext)
        md += "\nProfile of up2 detection+segmentation:\n\n" + ptext + "\n"
    command = "python projects/benchmark/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md += f"\nReproduce: `{command.strip()}`\n"
    os.makedirs(args.output, exist_ok=True)
    write_json_atomic({"meta": meta, "rows": rows, "profile": profiles, "paired": paired, "notes": notes,
                       "command": command},
                      os.path.join(args.output, "speed.json"))
    with atomic_write(os.path.join(args.output, "speed.md")) as f:
        f.write(md)
    print(f"\nwrote {args.output}/speed.json and speed.md; whole run {elapsed:.0f} s")


if __name__ == "__main__":
    main()
