"""Optimizers of up2: Task-Balanced Gradient Normalization (paper §4.4, DESIGN §6)."""
from .tbgn import TBGN

__all__ = ["TBGN"]
