"""The cluster path: compile the KFP pipeline to IR YAML and submit it to a KFP server."""

from __future__ import annotations

import os
import tempfile

from versavit.config import RunConfig


def _pipeline_func(cfg: RunConfig, pipeline: str):  # -> a @dsl.pipeline function
    import importlib

    os.environ["VERSAVIT_COMPONENT_IMAGE"] = cfg.launch.image  # read when components/ is imported
    os.environ["VERSAVIT_LABELER_IMAGE"] = cfg.launch.labeler_image
    import components

    if (cfg.launch.image, cfg.launch.labeler_image) != (components.IMAGE, components.LABELER_IMAGE):
        # components are defined at import: redefine them
        importlib.reload(components)
    from pipelines import PIPELINES

    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; expected one of {sorted(PIPELINES)}")
    return PIPELINES[pipeline](cfg)


def compile_pipeline(cfg: RunConfig, pipeline: str, output: str) -> str:
    """Write the pipeline as KFP IR YAML (self-contained: the resolved config is its default parameter)."""
    from kfp import compiler

    compiler.Compiler().compile(_pipeline_func(cfg, pipeline), output)
    return output


def submit_pipeline(cfg: RunConfig, pipeline: str, host: str, experiment: str = "versavit",
                    namespace: str | None = None, token: str | None = None,
                    service_account: str | None = None) -> tuple[str, str]:
    """Submit to the KFP API at `host`; returns (run id, run URL). The run's steps run as `service_account`
    (None: launch.pipeline_service_account; if that is null too, KFP's default: default-editor in a profile
    namespace, pipeline-runner standalone), which needs the Role of manifests/components/profile-namespace in
    the run's namespace: the training jobs are created there (versavit.launch.identity)."""
    import kfp

    service_account = service_account or cfg.launch.pipeline_service_account
    client = kfp.Client(host=host, namespace=namespace, existing_token=token)
    with tempfile.TemporaryDirectory() as tmp:
        path = compile_pipeline(cfg, pipeline, os.path.join(tmp, "pipeline.yaml"))
        run = client.create_run_from_pipeline_package(path, arguments={}, run_name=f"{cfg.name}-{pipeline}",
                                                      experiment_name=experiment, namespace=namespace,
                                                      enable_caching=True, service_account=service_account)
    return run.run_id, f"{host.rstrip('/')}/#/runs/details/{run.run_id}"
