"""Task adapters; each file registers its tasks in TASK_REGISTRY."""
from up2.modeling.tasks import captioning, classification, detection, masked_lm, retrieval  # noqa: F401
from up2.modeling.tasks.base import TASK_REGISTRY, TaskSpec, default_task_name, task_specs_from_config
from up2.modeling.tasks.task_data import check_datasets_registered, resolve_task_data, task_specs_for_model

__all__ = ["TASK_REGISTRY", "TaskSpec", "task_specs_from_config", "task_specs_for_model", "resolve_task_data",
           "check_datasets_registered", "default_task_name"]
