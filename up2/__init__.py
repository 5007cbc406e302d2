"""up2: Uni-Perceiver v2 on Detectron2.

Importing ``up2`` registers everything in detectron2's registries: the ``UniPerceiverV2``
meta-architecture, the Swin backbone, the task adapters, and the built-in datasets
(``shapes_train`` / ``shapes_val`` under ``$UP2_DATASETS``, default ``./datasets``).
"""
import warnings

# detectron2 / fvcore call torch.jit.script at import; torch 2.14 warns about it on every run.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

from up2.config import add_up2_config  # noqa: E402
from up2 import modeling  # noqa: F401,E402  (registers META_ARCH / BACKBONE / tasks)
from up2.data.datasets.builtin import register_all_builtin  # noqa: E402

register_all_builtin()

__all__ = ["add_up2_config"]
__version__ = "0.1.0"
