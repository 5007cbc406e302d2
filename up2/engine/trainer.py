"""UP2Trainer: detectron2's DefaultTrainer for the multi-task mix (paper §4.4).

Each task of ``cfg.TASKS`` gets its own infinite detectron2 loader (its own mapper and batch
size); a task sampler picks the task of every iteration; TBGN (or AdamW) steps; evaluation runs
every task on its test datasets with its own evaluator and prints one table per task.

Class names and dataset vocabularies are resolved from the training datasets once, when the
trainer is built (``resolve_task_data``), and every checkpoint carries them under
``up2_task_data``, so a trained model predicts without its training data. At the end of training
the inference checkpoint (``up2.checkpoint``: safetensors weights, config, task data, model card)
is written to ``OUTPUT_DIR/model_final_inference``, next to ``model_final.pth`` (kept for ``--resume``).
"""
from __future__ import annotations

import logging
import os
import random
import weakref
from collections import OrderedDict

import numpy as np
import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer, TrainerBase, create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.events import JSONWriter
from detectron2.utils.logger import setup_logger
from torch import nn

from up2.checkpoint import FINAL_FOLDER, UP2Checkpointer
from up2.data.multitask import MixedTaskSampler, MultiTaskLoader, UnmixedTaskSampler
from up2.data.samplers import ResumableTrainingSampler
from up2.engine.hooks import ExportInferenceCheckpoint, ProgressBar
from up2.engine.pretrained_weights import check_pretrained_weights, will_resume
from up2.engine.writers import StrictJSONWriter
from up2.engine.multitask_step import MultiTaskStep
from up2.modeling.tasks.base import TaskSpec, default_task_name, task_input_config, task_specs_from_config
from up2.modeling.tasks.task_data import TASK_DATA_KEY, check_datasets_registered, resolve_task_data, task_data_of
from up2.solver.tbgn import TBGN
from up2.solver.weight_decay import exclude_from_weight_decay, no_weight_decay_parameters

__all__ = ["UP2Trainer", "build_optimizer", "build_mapper", "TaskView", "configure_cuda", "pin_memory"]

def build_mapper(cfg, spec: TaskSpec, is_train: bool):
    """The dataset mapper of the task ``spec`` (``Task.build_mapper``), at the task's image size
    (``TASKS.<NAME>.IMAGE_SIZE``, :func:`up2.modeling.tasks.base.task_input_config`)."""
    return spec.task_class(spec).build_mapper(task_input_config(cfg, spec), is_train)


def _lr_factor(cfg):
    def factor(name: str) -> float:
        if name.startswith("backbone."):
            return cfg.SOLVER.BACKBONE_MULTIPLIER
        if name.startswith("text_encoder.model."):
            return cfg.SOLVER.TEXT_ENCODER_MULTIPLIER
        return 1.0

    return factor


def _with_full_model_clipping(optim_cls, max_norm: float, norm_type: float):
    """``optim_cls`` whose ``step`` first clips the gradient norm of ALL parameters together
    (MaskDINO's "full_model" clipping; detectron2 only clips per parameter). The norm before
    clipping is left in ``grad_norm`` (0-dim tensor); with ``norm_type`` 2 it is the L2 norm the
    trainer logs (``reports_grad_norm``), so the trainer does not compute it again."""

    class FullModelClipped(optim_cls):
        reports_grad_norm = float(norm_type) == 2.0
        grad_norm = None

        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            self.grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelClipped.__name__ = f"FullModelClipped{optim_cls.__name__}"
    return FullModelClipped


def _clipped(cfg, optim_cls):
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        return _with_full_model_clipping(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    return maybe_add_gradient_clipping(cfg, optim_cls)


def _fused_adamw_ok(cfg, model: torch.nn.Module) -> bool:
    """Whether torch's fused AdamW kernel (one pass over each parameter; ~5x faster than the
    per-parameter loop on CPU) can serve ``model``: every trainable parameter a floating tensor
    on CPU or CUDA, and no float16 GradScaler (the scaler would hand the fused step still-scaled
    gradients, after our full-model clipping)."""
    if cfg.SOLVER.AMP.ENABLED and cfg.SOLVER.AMP.DTYPE == "float16":
        return False
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters() if p.requires_grad)


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW or TBGN (paper §4.4) with the MaskDINO recipe: backbone and text
    encoder at reduced lr, no weight decay on norms, embeddings, the temperature tau, [SPE]
    and learned queries (``up2.solver.weight_decay``), and gradient clipping from
    ``cfg.SOLVER.CLIP_GRADIENTS`` (CLIP_TYPE "full_model" clips the norm over all parameters
    together; "value"/"norm" as detectron2). TBGN normalises the gradient itself, so clipping is
    not applied to it. AdamW uses torch's fused kernel where it can (:func:`_fused_adamw_ok`).

    Raises:
        ValueError: ``cfg.SOLVER.OPTIMIZER`` other than "ADAMW", "TBGN" or "SGD".
    """
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        lr_factor_func=_lr_factor(cfg),
    )
    # tau, embeddings, [SPE], learned queries: weight decay 0 (up2.solver.weight_decay)
    params = exclude_from_weight_decay(params, no_weight_decay_parameters(model).values())
    kind = cfg.SOLVER.OPTIMIZER.upper()
    if kind == "TBGN":
        return TBGN(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                    normalize=cfg.SOLVER.TBGN_NORMALIZE)
    if kind == "ADAMW":
        fused = _fused_adamw_ok(cfg, model)
        opt = _clipped(cfg, torch.optim.AdamW)(params, lr=cfg.SOLVER.BASE_LR, **({"fused": True} if fused else {}))

        def keep_kernel_choice(optimizer):
            # load_state_dict copies the saved groups' options, "fused" included: a checkpoint
            # from a fused run must not force the kernel where it cannot serve, nor an older
            # checkpoint turn it off.
            for group in optimizer.param_groups:
                group["fused"] = True if fused else None

        opt.register_load_state_dict_post_hook(keep_kernel_choice)
        return opt
    if kind == "SGD":
        opt = _clipped(cfg, torch.optim.SGD)
        return opt(params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV)
    raise ValueError(f"cfg.SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}: expected 'ADAMW', 'TBGN' or 'SGD'")


def configure_cuda(cfg, device) -> bool:
    """GPU training settings, process-wide, when ``device`` is a CUDA device: TF32 for float32
    matmuls and cuDNN convolutions (``cfg.CUDA_ALLOW_TF32``; bf16 autocast leaves some matmuls in
    float32, e.g. the likelihood) and cuDNN autotuning (detectron2's ``cfg.CUDNN_BENCHMARK``: one
    search per input shape, worth it for the fixed-size LSJ batches). Nothing is changed on
    other devices.

    Args:
        cfg: the config (reads CUDA_ALLOW_TF32 and CUDNN_BENCHMARK).
        device: the model's device (``torch.device`` or str).

    Returns:
        Whether the settings were applied (``device`` is CUDA).
    """
    if torch.device(device).type != "cuda":
        return False
    tf32 = bool(cfg.CUDA_ALLOW_TF32)
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)
    logging.getLogger(__name__).info(
        f"CUDA: TF32 for float32 matmuls and convolutions {'on' if tf32 else 'off'} (CUDA_ALLOW_TF32), "
        f"cudnn.benchmark {'on' if cfg.CUDNN_BENCHMARK else 'off'} (CUDNN_BENCHMARK)")
    return True


def pin_memory(cfg) -> bool:
    """Whether the training loaders pin their batches (``cfg.DATALOADER.PIN_MEMORY``), which
    makes the model's non-blocking image copies asynchronous: only for a CUDA model on a
    machine with CUDA (pinning needs it)."""
    return bool(cfg.DATALOADER.PIN_MEMORY) and torch.device(cfg.MODEL.DEVICE).type == "cuda" \
        and torch.cuda.is_available()


def _default_spec(cfg) -> TaskSpec:
    specs = task_specs_from_config(cfg)
    name = default_task_name(cfg, specs)
    if name is None:
        raise ValueError(f"which task? cfg.TASKS has {sorted(specs)} and no MODEL.DEFAULT_TASK: pass spec=")
    return specs[name]


class TaskView(nn.Module):
    """``model`` seen as a single-task detectron2 model: ``forward(inputs) = model(inputs, task=name)``."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batched_inputs):
        return self.model(batched_inputs, task=self.task)


class TaskDataRecord:
    """The task data (class names, dataset vocabularies) as a checkpointable of detectron2's
    checkpointer: saved in every checkpoint under ``up2_task_data``; on resume, a checkpoint
    whose task data differs from the config's is reported (the config's is used)."""

    def __init__(self, specs):
        self.specs = dict(specs)

    def state_dict(self) -> dict:
        return task_data_of(self.specs)

    def load_state_dict(self, state: dict) -> None:
        if state != self.state_dict():
            logging.getLogger(__name__).warning(
                "the checkpoint's task data (class names / vocabulary ids) differs from this config's; "
                "training goes on with the config's")


class UP2Trainer(DefaultTrainer):
    """Trains every task of ``cfg.TASKS`` jointly (unmixed sampling by default).

    Raises:
        ValueError: a task's dataset is not registered (the message says where up2 looked), or
            one of the errors of ``task_specs_from_config``.
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        check_datasets_registered(task_specs_from_config(cfg))
        cfg = resolve_task_data(cfg)  # a no-op when train_net.py's setup() did it already
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        self.specs = task_specs_from_config(cfg)
        model = self.build_model(cfg)
        configure_cuda(cfg, next(model.parameters()).device)
        optimizer = self.build_optimizer(cfg, model)
        loader = self.build_train_loader(cfg)
        # tasks use different parameters; every rank runs the same task, so DDP can skip the unused ones.
        # gradient_as_bucket_view: the gradients are views of DDP's all-reduce buckets (no copy, one
        # gradient-sized buffer less); parameters unused on every rank keep grad None as before.
        on_cpu = next(model.parameters()).device.type == "cpu"  # gloo on CPU: DDP wants device_ids=None
        model = create_ddp_model(model, broadcast_buffers=False, find_unused_parameters=True,
                                 gradient_as_bucket_view=True, **({"device_ids": None} if on_cpu else {}))
        amp = cfg.SOLVER.AMP.DTYPE if cfg.SOLVER.AMP.ENABLED else None
        self._trainer = MultiTaskStep(model, loader, optimizer, self.specs, amp_dtype=amp)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = UP2Checkpointer(model, cfg.OUTPUT_DIR, allow_pickle=cfg.MODEL.ALLOW_PICKLE_WEIGHTS,
                                            trainer=weakref.proxy(self), **{TASK_DATA_KEY: TaskDataRecord(self.specs)})
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume: bool = True) -> None:
        """detectron2's ``resume_or_load``: resume from the last checkpoint of OUTPUT_DIR when
        ``resume`` and one exists; otherwise start from MODEL.WEIGHTS, after checking that the
        pretrained weights are there or explicitly declined
        (:func:`up2.engine.pretrained_weights.check_pretrained_weights`; paper §5.2).

        Raises:
            FileNotFoundError / IsADirectoryError / ValueError: a training start whose backbone
                or text-encoder weights are missing without RANDOM_INIT (the message names the
                file and the converter command), or whose paths use an unset variable.
        """
        if will_resume(self.cfg, resume):
            weights = self.cfg.MODEL.WEIGHTS  # unused: detectron2 loads OUTPUT_DIR's last checkpoint
        else:
            weights = check_pretrained_weights(self.cfg)
        self.checkpointer.resume_or_load(weights, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1

    def train(self):
        """detectron2's training loop (hooks, final evaluation, ``TEST.EXPECTED_RESULTS`` check).

        Returns:
            the results of the last evaluation (:meth:`test`'s nested dict; detectron2's EvalHook
            evaluates after the last iteration, so normally the final model's, and on ranks other
            than the main one its dataset entries are ``{}``), or None when none ran. detectron2's
            own ``train`` returns them only when ``TEST.EXPECTED_RESULTS`` is set.
        """
        super().train()
        return getattr(self, "_last_eval_results", None)

    def build_writers(self):
        """detectron2's default writers, with ``metrics.json`` written as strict JSON (NaN -> null)."""
        writers = super().build_writers()
        for i, w in enumerate(writers):
            if type(w) is JSONWriter:
                path, window = w._file_handle.name, w._window_size
                w.close()
                writers[i] = StrictJSONWriter(path, window)
        return writers

    def build_hooks(self):
        """detectron2's hooks, a progress bar (UP2_PROGRESS_BAR), and last the export of the
        inference checkpoint to ``OUTPUT_DIR/model_final_inference`` (after the final evaluation,
        whose metrics go into its model card; ``up2.checkpoint``)."""
        hooks = super().build_hooks()
        if self.cfg.UP2_PROGRESS_BAR:
            hooks.insert(0, ProgressBar(self.cfg.SOLVER.MAX_ITER))
        hooks.append(ExportInferenceCheckpoint(os.path.join(self.cfg.OUTPUT_DIR, FINAL_FOLDER)))
        return hooks

    def state_dict(self):
        """detectron2's trainer state + the task sampler and the RNG states (augmentation,
        dropout, masking draw from them: torch's CPU generator, numpy, python, and the current
        CUDA device's generator when CUDA is in use), so that ``--resume`` continues exactly."""
        ret = super().state_dict()
        ret["task_sampler"] = self._trainer.loader.state_dict()
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
        # plain tensors / tuples only, so torch.load(weights_only=True) accepts the checkpoint
        ret["rng"] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            ret["rng"]["cuda"] = torch.cuda.get_rng_state()  # the current device's (dropout on the GPU)
        return ret

    def load_state_dict(self, state_dict):
        """Also restores the RNG states and moves every task's image stream past the images
        it has already trained on (exact when every batch is filled in order, i.e. without
        aspect-ratio grouping of mixed orientations and with a fixed world size)."""
        super().load_state_dict(state_dict)
        loader = self._trainer.loader
        if "task_sampler" in state_dict:
            loader.load_state_dict(state_dict["task_sampler"])
        if "rng" in state_dict:
            torch.set_rng_state(state_dict["rng"]["torch"])
            kind, keys, pos, has_gauss, gauss = state_dict["rng"]["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(state_dict["rng"]["python"])
            cuda = state_dict["rng"].get("cuda")  # absent: a CPU run, or a checkpoint from before it was saved
            if cuda is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(cuda)
        world = comm.get_world_size()
        for name, count in self._trainer.task_counts.items():
            loader.index_samplers[name].skip = count * (self.specs[name].ims_per_batch // world)

    @classmethod
    def build_train_loader(cls, cfg) -> MultiTaskLoader:
        """One infinite detectron2 loader per task, and the task sampler (DATALOADER.TASK_SAMPLING)."""
        specs = task_specs_from_config(cfg)
        check_datasets_registered(specs, test=False)
        loaders, samplers = {}, {}
        for name, spec in specs.items():
            localization = spec.task_class.localization
            dataset = get_detection_dataset_dicts(
                list(spec.datasets_train), filter_empty=localization and cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
            )
            samplers[name] = ResumableTrainingSampler(len(dataset), seed=cfg.DATALOADER.TASK_SAMPLER_SEED)
            loaders[name] = build_detection_train_loader(
                dataset=dataset,
                mapper=build_mapper(cfg, spec, is_train=True),
                sampler=samplers[name],
                total_batch_size=spec.ims_per_batch,
                aspect_ratio_grouping=localization,
                num_workers=cfg.DATALOADER.NUM_WORKERS,
                pin_memory=pin_memory(cfg),
            )
        # canonical task order: the unmixed draw maps a uniform number to a task through this order,
        # and YAML dumps (e.g. OUTPUT_DIR/config.yaml) sort keys, so config order must not matter
        names = sorted(specs)
        ratios = [specs[n].sampling_ratio for n in names]
        mode = cfg.DATALOADER.TASK_SAMPLING
        if mode == "unmixed":
            sampler = UnmixedTaskSampler(names, ratios, seed=cfg.DATALOADER.TASK_SAMPLER_SEED)
        elif mode == "mixed":
            sampler = MixedTaskSampler(names, ratios)
        else:
            raise ValueError(f"cfg.DATALOADER.TASK_SAMPLING must be 'unmixed' or 'mixed', got {mode!r}")
        loader = MultiTaskLoader(loaders, sampler)
        loader.index_samplers = samplers  # for resume: see UP2Trainer.load_state_dict
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name, spec: TaskSpec = None):
        """detectron2's test loader of ``dataset_name`` with the mapper and batch size of the task
        ``spec`` (default: the model's default task, ``default_task_name``)."""
        spec = spec or _default_spec(cfg)
        task = spec.task_class(spec)
        return build_detection_test_loader(
            dataset=get_detection_dataset_dicts([dataset_name], filter_empty=False),
            mapper=build_mapper(cfg, spec, is_train=False),
            batch_size=task.test_batch_size,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None, spec: TaskSpec = None):
        """The evaluator of the task ``spec`` (default: the model's default task) on ``dataset_name``
        (``Task.build_evaluator``)."""
        spec = spec or _default_spec(cfg)
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", spec.name, dataset_name)
        return spec.task_class(spec).build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate every task on its test datasets. Returns {task: {dataset: results}} when
        there are several tasks, else detectron2's {dataset: results} (or the results dict
        itself for a single dataset). ``model`` is evaluated as given: ``train_net.py --eval-only``
        passes it through ``up2.modeling.inference.prepare_for_inference`` first; the periodic
        evaluation during training runs the training model unprepared (same results, slower)."""
        specs = task_specs_from_config(cfg)
        check_datasets_registered(specs, train=False)
        logger = logging.getLogger("up2")
        everything = OrderedDict()
        for name, spec in specs.items():
            per_task = OrderedDict()
            for dataset in spec.datasets_test:
                loader = cls.build_test_loader(cfg, dataset, spec)
                evaluator = cls.build_evaluator(cfg, dataset, spec=spec)
                results = inference_on_dataset(TaskView(model, name), loader, evaluator)
                per_task[dataset] = results
                if comm.is_main_process() and results:
                    logger.info(f"Evaluation results of task {name} on {dataset}:")
                    print_csv_format(results)
            everything[name] = per_task
        if len(everything) == 1:
            only = next(iter(everything.values()))
            return next(iter(only.values())) if len(only) == 1 else only
        return everything
