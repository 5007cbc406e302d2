"""Optimizers of up2: Task-Balanced Gradient Normalization (paper §4.4)."""
from .tbgn import TBGN

__all__ = ["TBGN"]
