"""Optimizers of up2: Task-Balanced Gradient Normalization (paper §4.4), and which parameters
are exempt from weight decay."""
from .tbgn import TBGN
from .weight_decay import exclude_from_weight_decay, no_weight_decay_parameters

__all__ = ["TBGN", "exclude_from_weight_decay", "no_weight_decay_parameters"]
