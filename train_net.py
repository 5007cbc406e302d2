#!/usr/bin/env python
"""Train / evaluate UniPerceiverV2 the detectron2 way.

    python train_net.py --config-file configs/up2_R50.yaml --num-gpus 8
    python train_net.py --config-file configs/tiny/det_shapes.yaml --eval-only MODEL.WEIGHTS output/model_final.pth

Training ends by writing OUTPUT_DIR/model_final_inference, the shareable inference checkpoint
(up2.checkpoint); ``python -m up2.export`` writes one for any training checkpoint. Both training
(its final evaluation) and --eval-only end by printing one table of every task's metrics and
writing it to OUTPUT_DIR/eval_table.{json,md} (up2.evaluation.report); --eval-only also writes
the raw results to OUTPUT_DIR/eval_results.json.
"""
import os

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import up2  # noqa: F401  (registers the model, backbone, tasks and datasets)
from up2 import add_up2_config
from up2.checkpoint import UP2Checkpointer, config_for_weights
from up2.engine import UP2Trainer
from up2.engine.pretrained_weights import check_pretrained_weights, will_resume
from up2.evaluation import evaluation_rows, format_evaluation_table, write_evaluation_table
from up2.modeling.inference import prepare_for_inference
from up2.modeling.tasks import check_datasets_registered, default_task_name, resolve_task_data, task_specs_from_config
from up2.utils import write_json_atomic
from up2.utils.distributed import launch  # detectron2 launch + barrier and destroy_process_group in every worker
from up2.utils.paths import expand_path


def setup(args):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if args.eval_only:  # the model to evaluate ($VAR expanded); training expands it in UP2Trainer.resume_or_load
        cfg.MODEL.WEIGHTS = expand_path(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
        cfg = config_for_weights(cfg)  # an inference checkpoint folder brings its text encoder (up2.checkpoint)
    # class names and dataset vocabularies, resolved once (from the checkpoint first when
    # evaluating it): the dumped OUTPUT_DIR/config.yaml then predicts without the datasets
    cfg = resolve_task_data(cfg, use_checkpoint=args.eval_only)
    # what would fail later is checked before default_setup writes OUTPUT_DIR/config.yaml
    specs = task_specs_from_config(cfg)
    default_task_name(cfg, specs)  # MODEL.DEFAULT_TASK names a task
    check_datasets_registered(specs, train=not args.eval_only)
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup configures the "detectron2" and "fvcore" loggers; up2's own (task evaluation tables) too
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="up2")
    return cfg


def report_evaluation(cfg, results, skip_empty: bool = False):
    """Main process: print the table of ``results`` (``UP2Trainer.test``'s output) and write it to
    OUTPUT_DIR/eval_table.json and eval_table.md (``up2.evaluation.report``); with ``skip_empty``,
    only when the table has a row. Other ranks do nothing."""
    if not comm.is_main_process():
        return
    rows = evaluation_rows(cfg, results)
    if rows or not skip_empty:
        write_evaluation_table(cfg, results, cfg.OUTPUT_DIR)
        print(format_evaluation_table(rows), flush=True)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = UP2Trainer.build_model(cfg)
        UP2Checkpointer(model, save_dir=cfg.OUTPUT_DIR, allow_pickle=cfg.MODEL.ALLOW_PICKLE_WEIGHTS).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        results = UP2Trainer.test(cfg, prepare_for_inference(model))
        if comm.is_main_process():
            write_json_atomic(results, os.path.join(cfg.OUTPUT_DIR, "eval_results.json"))
        report_evaluation(cfg, results)
        return results
    if not will_resume(cfg, args.resume):
        check_pretrained_weights(cfg)  # before the datasets load: a missing checkpoint fails in seconds
    trainer = UP2Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()  # the final evaluation's (None when none ran)
    report_evaluation(trainer.cfg, results, skip_empty=True)
    return results


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
