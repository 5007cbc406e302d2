"""Model parts; importing registers them (meta-architecture, Swin backbone, task adapters)."""
from up2.modeling import backbone  # noqa: F401
from up2.modeling import tasks  # noqa: F401
from up2.modeling.meta_arch import UniPerceiverV2

__all__ = ["UniPerceiverV2"]
