"""Orchestration with Kubeflow Pipelines: the local runner, compiling and submitting.

`components/` and `pipelines/` (top level) define the pipelines over versavit's stage functions;
this package runs them: `run_local` here, `compile_pipeline` / `submit_pipeline` for a cluster.
"""
