"""KFP v2 launcher-contract runner for tests: executes a compiled pipeline YAML task by task (see `runner`)."""
from .driver import DriverError, type_flow_problems
from .runner import (DriverFailed, RunResult, TaskFailed, TaskRecord, UnsupportedFeature, parse_pipeline_spec,
                     run_pipeline)

__all__ = ["DriverError", "DriverFailed", "RunResult", "TaskFailed", "TaskRecord", "UnsupportedFeature",
           "parse_pipeline_spec", "run_pipeline", "type_flow_problems"]
