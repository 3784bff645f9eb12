"""Training stage of the LGFF embedding model: loop, checkpoints, feature cache, LR schedule (DESIGN.md section 3)."""
from .trainer import train_stage

__all__ = ["train_stage"]
