"""The optional explain stage of train_and_index, kept in one place: the pipeline calls `explain_task` after the
model's index is built and passes `report_kwargs(task)` to the report (which then links the explanation page)."""
from __future__ import annotations

from typing import Optional

from kfp import dsl

import components as c
from lgff_core.config import LGFFConfig
from lgff_core.kfp.config import stage_config_yaml

from ._wiring import configure_task


def explain_task(cfg: LGFFConfig, model, index_task: dsl.PipelineTask) -> Optional[dsl.PipelineTask]:
    """Ablation CAM of ``explain.num_queries`` test queries (None when ``explain.enabled`` is false).

    Runs with the evaluate stage's resources (CPU; a few hundred neck forward passes per image)."""
    if not cfg.explain.enabled:
        return None
    task = c.explain(config_yaml=stage_config_yaml(cfg, "explain"), model=model, index=index_task.outputs["index"])
    return configure_task(task, cfg, "evaluate", "explain")


def report_kwargs(task: Optional[dsl.PipelineTask]) -> dict:
    """Extra report inputs: the explanation directory when the explain stage runs."""
    return {} if task is None else {"explain": task.outputs["explain_dir"]}
