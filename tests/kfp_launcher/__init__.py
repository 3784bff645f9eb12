"""KFP v2 launcher-contract runner for tests: executes a compiled pipeline YAML task by task (see `runner`)."""
from .runner import RunResult, TaskFailed, TaskRecord, UnsupportedFeature, parse_pipeline_spec, run_pipeline

__all__ = ["RunResult", "TaskFailed", "TaskRecord", "UnsupportedFeature", "parse_pipeline_spec", "run_pipeline"]
