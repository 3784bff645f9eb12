"""The Kubeflow layer of lgff_core: pipeline compile / run / submit, per-stage config slices, the launcher
contract of a component (runtime) and the run-time fan-out plan. Imports kfp; nothing below it does."""
