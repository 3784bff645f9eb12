"""Training stage of the LGFF embedding model: loop, checkpoints, feature cache, LR schedule (DESIGN.md section 3).

`train_stage(cfg, data_uri, out_uri, init=None, resume=False, feature_cache=None) -> dict` trains one strategy
stage; `checkpoint.load_model_from_checkpoint(uri, device="cpu") -> (model, meta)` rebuilds a trained model.
"""
from .checkpoint import load_model_from_checkpoint
from .embedding import train_stage
from .loop import StopTraining

__all__ = ["train_stage", "load_model_from_checkpoint", "StopTraining"]
