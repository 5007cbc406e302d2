"""The sections of ``gpu_check.py`` (what each measures: its docstring) and what they share."""
from __future__ import annotations

import copy
import gc
import hashlib
import os
import platform
import random
import socket
import subprocess
import tempfile
from collections import Counter
from contextlib import contextmanager

try:  # imported as projects.benchmark.gpu_sections, or from a script in this folder
    from . import check_harness, msda_speed, paper_step, random_roberta, timing
except ImportError:
    import check_harness, msda_speed, paper_step, random_roberta, timing  # noqa: E401

Report, Skipped, capture_warnings = check_harness.Report, check_harness.Skipped, check_harness.capture_warnings

REPO = check_harness.REPO
TINY_BASE = os.path.join(REPO, "configs", "tiny", "Base-tiny.yaml")
LOCALIZATION = ("detection", "instance_segmentation")
REDUCED_CLASS_NAMES = 20  # reduced mode: the first 20 class names of each task


class Check:
    """What the sections share: arguments, device, report, the random text encoder's folder."""

    def __init__(self, args, report: Report):
        import torch

        self.args, self.report = args, report
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        self.cuda = self.device.type == "cuda"
        self.amp = {"bf16": torch.bfloat16, "fp32": None}[args.dtype]  # --dtype auto is resolved by then
        self._tmp = None

    def require_cuda(self):
        if not self.cuda:
            raise Skipped("no CUDA")

    def text_encoder(self) -> str:
        """A folder with a random RoBERTa-shaped encoder's config and tokenizer (written once)."""
        if self.args.text_encoder:
            return self.args.text_encoder
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gpu_check_text_")
            corpus = [" ".join(paper_step.WORDS)] * 20
            if self.args.reduced:
                random_roberta.write_random_roberta_base(self._tmp.name, corpus, vocab_size=1000, weights=False,
                                                         hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                         intermediate_size=128)
            else:
                random_roberta.write_random_roberta_base(self._tmp.name, corpus, weights=False)
        return self._tmp.name

    def cfg(self):
        """``--config`` with random weights on this device (reduced: the tiny model, the config's tasks)."""
        cfg = paper_step.load_config(self.args.config)
        if self.args.reduced:
            paper, cfg = cfg, paper_step.load_config(TINY_BASE)
            cfg.TASKS = paper.TASKS.clone()
            cfg.SOLVER.OPTIMIZER = paper.SOLVER.OPTIMIZER
            cfg.MODEL.UNIFIED_DECODER.MOE.ENABLED = paper.MODEL.UNIFIED_DECODER.MOE.ENABLED
        if self.args.tasks:
            unknown = sorted(set(self.args.tasks) - set(cfg.TASKS.keys()))
            if unknown:
                raise ValueError(f"--tasks {unknown}: not tasks of {self.args.config} ({sorted(cfg.TASKS.keys())})")
            for name in list(cfg.TASKS.keys()):
                if name not in self.args.tasks:
                    del cfg.TASKS[name]
        cfg.MODEL.TEXT_ENCODER.RANDOM_INIT = True  # the folder holds config and tokenizer, no weights
        cfg = paper_step.random_weights_cfg(cfg, self.text_encoder(), str(self.device))
        if self.args.reduced:  # ImageNet's 1,000 names through f_text and g would dominate a tiny step
            for name in cfg.TASKS.keys():
                if len(cfg.TASKS[name].get("CLASS_NAMES", [])) > REDUCED_CLASS_NAMES:
                    cfg.TASKS[name].CLASS_NAMES = list(cfg.TASKS[name].CLASS_NAMES)[:REDUCED_CLASS_NAMES]
        return cfg

    def build(self, cfg, train: bool = True):
        import torch
        from detectron2.modeling import build_model

        torch.manual_seed(0)
        model = build_model(cfg)
        return model.train(train)

    def per_gpu_batch(self, spec) -> int:
        b = max(1, spec.ims_per_batch // self.args.num_gpus)
        return min(b, 2) if self.args.reduced else b

    def sync(self):
        timing.sync(self.device.type)

    def reset_peak(self):
        import torch

        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float:
        import torch

        return torch.cuda.max_memory_allocated() / 1e9


def make_batch(cfg, spec, folder: str, n: int) -> list:
    """``n`` synthetic records of the task's type (``paper_step._record``) through its training mapper."""
    import numpy as np
    import torch

    from up2.engine.trainer import build_mapper

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    mapper = build_mapper(cfg, spec, is_train=True)
    record = paper_step._record(spec.type, folder, len(spec.class_names or []) or 1)
    return [mapper(copy.deepcopy(record)) for _ in range(n)]


def train_step(model, optimizer, name: str, batch: list, amp, s_k: float, grad_weight: float):
    """One iteration as ``MultiTaskStep.run_step`` makes it (no host sync here); returns the loss tensor."""
    import torch

    from up2.solver.tbgn import TBGN

    optimizer.zero_grad(set_to_none=True)
    device = next(model.parameters()).device.type
    with torch.autocast(device_type=device, dtype=amp or torch.bfloat16, enabled=amp is not None):
        losses = model(batch, task=name)
    loss = sum(losses.values())
    loss.backward()
    if isinstance(optimizer, TBGN):
        optimizer.set_task(s_k, grad_weight)
    optimizer.step()
    return loss.detach()


def sampling_ratios(specs) -> dict:
    total = sum(s.sampling_ratio for s in specs.values())
    return {k: s.sampling_ratio / total for k, s in specs.items()}


# ---- sections ------------------------------------------------------------------------------------
def _version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "absent"


def up2_commit() -> str:
    """The checkout's commit (``-dirty`` when tracked files changed), else $UP2_COMMIT (a copy without .git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("UP2_COMMIT", "unknown")


def source_digest() -> str:
    """sha1 (12 hex) of up2/**/*.py, configs/**/*.yaml and projects/benchmark/*.py (paths and bytes)."""
    h = hashlib.sha1()
    for top, ext in (("up2", ".py"), ("configs", ".yaml"), (os.path.join("projects", "benchmark"), ".py")):
        for d, dirs, files in sorted(os.walk(os.path.join(REPO, top))):
            dirs.sort()
            for f in sorted(files):
                if f.endswith(ext):
                    path = os.path.join(d, f)
                    h.update(os.path.relpath(path, REPO).encode() + b"\0")
                    with open(path, "rb") as fh:
                        h.update(fh.read())
    return h.hexdigest()[:12]


def section_env(ck: Check):
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "triton": _version("triton"), "transformers": _version("transformers"),
            "detectron2": _version("sal-detectron2"), "up2_commit": up2_commit(), "up2_sources_sha1": source_digest(),
            "device": ck.device, "reduced": ck.args.reduced, "UP2_MSDA_PATH": os.environ.get("UP2_MSDA_PATH", "unset"),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}
    ck.report.result("env.cpu_count", len(os.sched_getaffinity(0)))
    ck.report.result("env.cuda_available", torch.cuda.is_available())
    if ck.cuda:
        props = torch.cuda.get_device_properties(ck.device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}")
        ck.report.result("env.gpu_count", torch.cuda.device_count())
        ck.report.result("env.gpu_memory_gib", props.total_memory / 2**30)
        ck.report.result("env.gpu_sm_count", props.multi_processor_count)
    for k, v in info.items():
        print(f"ENV {k}={v}")


@contextmanager
def msda_path(value):
    """``UP2_MSDA_PATH`` set to ``value`` (None: unset) in the body."""
    from up2.layers.msda import PATH_ENV

    old = os.environ.pop(PATH_ENV, None)
    if value is not None:
        os.environ[PATH_ENV] = value
    try:
        yield
    finally:
        os.environ.pop(PATH_ENV, None)
        if old is not None:
            os.environ[PATH_ENV] = old


def msda_inputs(ck: Check, case: str):
    """(level shapes, value, locations, attention) of an encoder or decoder case, float32 on the CPU."""
    import torch

    size, batch, queries = ((128, 128), 1, 30) if ck.args.reduced else ((1024, 1024), 2, 300)
    shapes = msda_speed.level_shapes(*size, (8, 16, 32))
    dim, heads, points = 256, 8, 4
    value, loc, attn = msda_speed.make_inputs(shapes, batch, dim, heads, points)
    if case == "decoder":  # queries around random box centres, offsets of a few pixels
        g = torch.Generator().manual_seed(1)
        wh = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
        ref = torch.rand(batch, queries, 1, 1, 1, 2, generator=g)
        loc = ref + 4 * torch.randn(batch, queries, heads, len(shapes), points, 2, generator=g) / wh[:, None, :]
        attn = torch.randn(batch, queries, heads, len(shapes) * points, generator=g).softmax(-1)
        attn = attn.view(batch, queries, heads, len(shapes), points)
    return shapes, value, loc, attn


def section_msda(ck: Check):
    import torch

    from up2.layers.msda import ms_deform_attn_core, ms_deform_attn_core_pytorch
    from up2.layers.msda.routing import select_path

    dev, reduced = ck.device, ck.args.reduced
    warm, reps = (1, 3) if reduced else (3, 20)
    for case in ("encoder", "decoder"):
        shapes, value, loc, attn = msda_inputs(ck, case)
        print(f"msda {case}: levels {shapes}, value {tuple(value.shape)}, locations {tuple(loc.shape)}")
        for dname, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            v, a, xy = value.to(dev, dt), attn.to(dev, dt), loc.to(dev)  # locations stay fp32
            grad_out = torch.randn(v.shape[0], xy.shape[1], v.shape[2] * v.shape[3]).to(dev, dt)

            def ref32(v_, xy_, a_):  # today's PyTorch path: computed in fp32, returned in value's dtype
                return ms_deform_attn_core_pytorch(v_.float(), shapes, xy_.float(), a_.float()).to(v_.dtype)

            paths = {"reference": ref32}
            if dt != torch.float32:
                paths["reference_bf16"] = lambda v_, xy_, a_: ms_deform_attn_core_pytorch(v_, shapes, xy_.to(dt), a_)
            for forced in [None, *ck.args.msda_paths]:
                def op(v_, xy_, a_, forced=forced):
                    with msda_path(forced):
                        return ms_deform_attn_core(v_, shapes, None, xy_, a_)
                try:
                    with msda_path(forced):
                        runs = select_path(dev)
                except (ValueError, RuntimeError) as e:  # a path this checkout or device does not have
                    print(f"msda: UP2_MSDA_PATH={forced} cannot run here: {e}")
                    continue
                paths[forced or "auto"] = (op, runs)
            leaves32 = [t.float().requires_grad_() for t in (v, xy, a)]
            out32 = ref32(*leaves32)
            want = [out32.detach(), *torch.autograd.grad(out32, leaves32, grad_out.float())]
            measured = {}  # path -> {"fwdbwd_ms": ..., "fwdbwd_peak_mb": ...}
            for pname, entry in paths.items():
                fn, runs = entry if isinstance(entry, tuple) else (entry, None)
                keys = dict(case=case, dtype=dname, path=pname, **({"runs": runs} if runs else {}))

                def fwd():
                    with torch.no_grad():
                        return fn(v, xy, a)

                def fwd_bwd():
                    leaves = [t.detach().clone().requires_grad_() for t in (v, xy, a)]
                    out = fn(*leaves)
                    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]

                for label, call, n in (("fwd", fwd, reps), ("fwdbwd", fwd_bwd, max(1, reps // 2))):
                    t = timing.measure([call], dev.type, [warm], n)[0]
                    got = measured.setdefault(pname, {})
                    got[f"{label}_ms"] = 1e3 * t["median_s"]
                    ck.report.result(f"msda.{label}_ms", got[f"{label}_ms"], **keys)
                    if ck.cuda:
                        base = torch.cuda.memory_allocated()
                        ck.reset_peak()
                        call()
                        ck.sync()
                        got[f"{label}_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                        ck.report.result(f"msda.{label}_peak_mb", got[f"{label}_peak_mb"], **keys)
                got = fwd_bwd()
                for tname, g, w in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, want):
                    ck.report.result("msda.max_err", (g.float() - w).abs().max().item(), tensor=tname, **keys)
            for tname, w in zip(("out", "grad_value", "grad_loc", "grad_attn"), want):
                ck.report.result("msda.ref_max_abs", w.abs().max().item(), case=case, dtype=dname, tensor=tname)
            ref = measured["reference"]
            for pname, got in measured.items():  # issue 17's targets: >= 5x faster, <= 1/5 of the memory
                if pname.startswith("reference"):
                    continue
                keys = dict(case=case, dtype=dname, path=pname)
                ck.report.result("msda.fwdbwd_speedup_vs_reference", ref["fwdbwd_ms"] / got["fwdbwd_ms"], **keys)
                if ck.cuda:
                    ck.report.result("msda.fwdbwd_peak_vs_reference", got["fwdbwd_peak_mb"] / max(ref["fwdbwd_peak_mb"], 1e-9),
                                     **keys)


def section_train(ck: Check):
    import torch

    from up2.engine.trainer import build_optimizer
    from up2.modeling.tasks.base import task_specs_from_config

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    cfg = ck.cfg()
    model = ck.build(cfg)
    optimizer = build_optimizer(cfg, model)
    specs = task_specs_from_config(cfg)
    ratios = sampling_ratios(specs)
    ck.report.result("train.parameters_m", sum(p.numel() for p in model.parameters()) / 1e6)
    warm, reps = (0, 1) if ck.args.reduced else (1, 3)  # reduced: the first step only
    with tempfile.TemporaryDirectory() as folder:
        for name, spec in specs.items():
            want = b = ck.per_gpu_batch(spec)
            while True:
                try:
                    batch = make_batch(cfg, spec, folder, b)
                    ck.reset_peak()
                    losses = []
                    t = timing.measure([lambda: losses.append(train_step(model, optimizer, name, batch, ck.amp, ratios[name],
                                                                         spec.grad_weight))], ck.device.type, [warm], reps)[0]
                    break
                except oom:
                    if b == 1:
                        raise
                # out of the except block, so that its traceback no longer holds the step's tensors
                batch = losses = None
                optimizer.zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.empty_cache()
                print(f"train {name}: out of memory at batch {b}; trying {b // 2}", flush=True)
                b //= 2
            keys = dict(task=name, dtype=ck.args.dtype, batch=b)
            ck.report.result("train.per_gpu_batch", b, task=name, config=want)
            ck.report.result("train.s_per_iter", t["median_s"], **keys)
            ck.report.result("train.first_s", t["first_s"], **keys)
            ck.report.result("train.img_per_s", b / t["median_s"], **keys)
            ck.report.result("train.loss", float(losses[-1]), **keys)
            if ck.cuda:
                ck.report.result("train.peak_gb", ck.peak_gb(), **keys)
                ck.report.result("train.peak_reserved_gb", torch.cuda.max_memory_reserved() / 1e9, **keys)


def _counted_syncs(fn):
    """(result of fn(), [CapturedWarning] of the synchronising CUDA calls it made)."""
    import torch

    with capture_warnings() as seen:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return out, [w for w in seen if "synchroniz" in w.message]


def _print_sites(title: str, warnings_, top: int):
    sites = Counter(w.site for w in warnings_)
    print(f"{title}: {len(warnings_)} synchronising calls; top call sites:")
    for site, n in sites.most_common(top):
        print(f"  {n:5d}  {site}")


def section_sync(ck: Check):
    import torch

    from up2.engine.trainer import build_optimizer
    from up2.modeling.tasks.base import task_specs_from_config

    ck.require_cuda()
    _, probe = _counted_syncs(lambda: torch.ones(1, device=ck.device).item())
    if not probe:
        raise RuntimeError("set_sync_debug_mode('warn') raised no warning for .item(): counts would mean nothing")
    cfg = ck.cfg()
    model = ck.build(cfg)
    optimizer = build_optimizer(cfg, model)
    specs = task_specs_from_config(cfg)
    ratios = sampling_ratios(specs)
    every = []
    with tempfile.TemporaryDirectory() as folder:
        for name, spec in specs.items():
            b = min(ck.per_gpu_batch(spec), ck.args.sync_batch)
            batch = make_batch(cfg, spec, folder, b)
            step = lambda: train_step(model, optimizer, name, batch, ck.amp, ratios[name], spec.grad_weight)  # noqa: E731
            if not ck.args.reduced:
                step()  # an uncounted first step: lazy initialisation, autotuning
                ck.sync()
            _, syncs = _counted_syncs(step)
            ck.sync()
            every += syncs
            ck.report.result("sync.count", len(syncs), task=name, mode="train", batch=b)
            _print_sites(f"sync {name} (train, batch {b})", syncs, 12)
        loc = [n for n, s in specs.items() if s.type in LOCALIZATION]
        if loc:
            model.eval()
            inputs = infer_inputs(ck, 1)
            with torch.inference_mode():
                if not ck.args.reduced:
                    model(inputs, task=loc[0])  # uncounted: target embeddings, autotuning
                    ck.sync()
                _, syncs = _counted_syncs(lambda: model(inputs, task=loc[0]))
            ck.report.result("sync.count", len(syncs), task=loc[0], mode="infer", batch=1)
            _print_sites(f"sync {loc[0]} (inference, fp32, batch 1)", syncs, 12)
    _print_sites("sync, all training steps", every, 20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section_ddp(ck: Check):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from up2.engine.trainer import build_optimizer
    from up2.modeling.tasks.base import task_specs_from_config

    backend = ck.args.ddp_backend
    if backend == "nccl":
        ck.require_cuda()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        cfg = ck.cfg()
        model = ck.build(cfg)
        optimizer = build_optimizer(cfg, model)
        with capture_warnings() as seen:
            ddp = DistributedDataParallel(model, device_ids=[ck.device.index or 0] if ck.cuda else None,
                                          broadcast_buffers=False, find_unused_parameters=True)
        ck.report.result("ddp.wrap_warnings", len(seen), backend=backend)
        for w in seen:
            print(f"ddp wrap warning ({w.category}): {w.message}")
        specs = task_specs_from_config(cfg)
        ratios = sampling_ratios(specs)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        never = set(trainable)
        with tempfile.TemporaryDirectory() as folder:
            for name, spec in specs.items():
                batch = make_batch(cfg, spec, folder, 1)
                with capture_warnings() as seen:
                    train_step(ddp, optimizer, name, batch, ck.amp, ratios[name], spec.grad_weight)
                    ck.sync()
                unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
                never &= set(unused)
                ck.report.result("ddp.warnings", len(seen), task=name, backend=backend)
                for (cat, msg), n in Counter((w.category, w.message.strip()) for w in seen).items():
                    print(f"ddp {name} warning x{n} ({cat}): {msg[:500]}")
                ck.report.result("ddp.params_without_grad", len(unused), task=name, of=len(trainable))
                print(f"ddp {name}: without gradient: {_grouped(unused)}")
        ck.report.result("ddp.params_never_with_grad", len(never), of=len(trainable))
        print(f"ddp: left without gradient by every task: {_grouped(sorted(never))}")
    finally:
        dist.destroy_process_group()


def _grouped(names, depth: int = 3) -> str:
    """Parameter names counted by their first ``depth`` dotted parts (e.g. 'text_encoder.model.pooler x2')."""
    if not names:
        return "none"
    groups = Counter(".".join(n.split(".")[:depth]) for n in names)
    return ", ".join(f"{g} x{n}" for g, n in sorted(groups.items()))


def infer_inputs(ck: Check, n: int) -> list:
    h, w = ck.args.infer_size
    return [{"image": speed_image(h, w, i), "height": h, "width": w} for i in range(n)]


def speed_image(h: int, w: int, seed: int):
    import torch

    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def section_infer(ck: Check):
    import torch

    from up2.modeling.inference import prepare_for_inference
    from up2.modeling.tasks.base import task_specs_from_config

    cfg = ck.cfg()
    names = [n for n, s in task_specs_from_config(cfg).items() if s.type in LOCALIZATION]
    if not names:
        raise Skipped(f"no detection / instance segmentation task in {ck.args.config}")
    model = prepare_for_inference(ck.build(cfg, train=False))
    h, w = ck.args.infer_size
    warm, reps = (1, 2) if ck.args.reduced else (2, 10)
    for name in names:
        for dname, dt in (("fp32", None), ("bf16", torch.bfloat16)):
            model.inference_amp = dt
            for b in ck.args.infer_batches:
                inputs = infer_inputs(ck, b)
                ck.reset_peak()
                with torch.inference_mode():
                    t = timing.measure([lambda: model(inputs, task=name)], ck.device.type, [warm], reps)[0]
                keys = dict(task=name, dtype=dname, batch=b, size=f"{h}x{w}")
                ck.report.result("infer.img_per_s", b / t["median_s"], **keys)
                ck.report.result("infer.ms_per_batch", 1e3 * t["median_s"], **keys)
                if ck.cuda:
                    ck.report.result("infer.peak_gb", ck.peak_gb(), **keys)


SECTION_FNS = {"env": section_env, "msda": section_msda, "train": section_train, "sync": section_sync,
               "ddp": section_ddp, "infer": section_infer}
