"""Detectron2 ``DatasetEvaluator``s of the non-localization tasks (paper §5.1).

Detection and instance segmentation use detectron2's ``COCOEvaluator``. Each evaluator here
gathers its records to rank 0 with ``detectron2.utils.comm.gather`` and returns detectron2-style
results ``{task_key: {metric: value}}`` with values in percent (x100) on the main process and
``{}`` on the others. See each module's docstring for the input / output fields it reads.
:mod:`up2.evaluation.report` turns the results of every task into one table.
"""
from up2.evaluation.captioning import (CaptioningEvaluator, caption_scores, load_coco_captions, simple_tokenize,
                                      tokenize_captions)
from up2.evaluation.classification import ClassificationEvaluator
from up2.evaluation.mlm import IGNORE_INDEX, MaskedLMEvaluator
from up2.evaluation.report import evaluation_rows, format_evaluation_table, write_evaluation_table
from up2.evaluation.retrieval import RetrievalEvaluator, retrieval_recalls

__all__ = [
    "ClassificationEvaluator",
    "RetrievalEvaluator",
    "retrieval_recalls",
    "CaptioningEvaluator",
    "caption_scores",
    "load_coco_captions",
    "simple_tokenize",
    "tokenize_captions",
    "MaskedLMEvaluator",
    "IGNORE_INDEX",
    "evaluation_rows",
    "format_evaluation_table",
    "write_evaluation_table",
]
