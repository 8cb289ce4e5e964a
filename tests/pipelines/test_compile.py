"""The cluster path: compiled KFP IR YAML has every stage in order, secrets by name, no credential values."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from versavit.config import ConfigError, load_config
from versavit.kfp.cluster import compile_pipeline

ROOT = Path(__file__).resolve().parents[2]
# one worker runs the module (make test: xdist), so each pipeline is compiled once (_compiled_text's cache)
pytestmark = pytest.mark.xdist_group("compile")
SECRET = "S3CR3T-VALUE-never-in-yaml"


@functools.cache
def _compiled_text(pipeline: str, config: str, overrides: tuple[str, ...]) -> str:
    """Compiled once per (pipeline, config, overrides) in this process: the paper pipeline takes ~5 s to compile,
    and several tests read the same one (every test of this module runs with the credentials in the env)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / f"{pipeline}.yaml"
        compile_pipeline(load_config(ROOT / config, list(overrides)), pipeline, str(out))
        return out.read_text()


def compiled(tmp_path: Path, pipeline: str, config: str = "configs/paper.yaml", *overrides: str) -> dict:
    text = _compiled_text(pipeline, config, overrides)
    assert SECRET not in text
    return yaml.safe_load_all(text).__next__() | {"_text": text}


def _inner(spec: dict) -> str:
    tasks = spec["root"]["dag"]["tasks"]
    return next(t for t in tasks.values() if "exit-handler" in t["componentRef"]["name"])["componentRef"]["name"]


def _deps(spec: dict) -> dict[str, set[str]]:
    tasks = spec["root"]["dag"]["tasks"]
    inner = next(t for t in tasks.values() if "exit-handler" in t["componentRef"]["name"])
    body = spec["components"][inner["componentRef"]["name"]]["dag"]["tasks"]
    return {name: set(t.get("dependentTasks", [])) for name, t in body.items()}


@pytest.fixture(autouse=True)
def credentials_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)


EVALUATORS = {f"evaluator{'' if i == 1 else f'-{i}'}" for i in range(1, 6)}  # tiny.yaml's five


def _step_names(spec: dict) -> dict[str, str]:
    inner = next(t for t in spec["root"]["dag"]["tasks"].values() if "exit-handler" in t["componentRef"]["name"])
    body = spec["components"][inner["componentRef"]["name"]]["dag"]["tasks"]
    return {body[n]["taskInfo"]["name"]: n for n in body}


def test_full_pipeline_stages_in_order(tmp_path: Path) -> None:
    spec = compiled(tmp_path, "versavit", "configs/tiny.yaml")
    deps = _deps(spec)
    assert set(deps) == {"open-run", "data", "data-check", "label", "train", "train-2", "evaluate", *EVALUATORS}
    assert "open-run" in deps["data"] and "data" in deps["label"]
    assert "label" in deps["train"]  # warm-up after labelling
    assert "train" in deps["train-2"]  # multi-task after warm-up
    # evaluation fans out, one step per evaluator after training, then the report after all of them
    assert all("train-2" in deps[e] for e in EVALUATORS) and deps["evaluate"] >= EVALUATORS
    steps = _step_names(spec)
    assert {f"evaluate-{n}" for n in load_config(ROOT / "configs/tiny.yaml").eval.evaluators} | {"report"} <= set(
        steps)
    # the exit handler closes the MLflow parent run whatever happens
    assert any("close-run" in t["componentRef"]["name"] for t in spec["root"]["dag"]["tasks"].values())
    # a CPU config (launch.resources.gpus_per_node 0): no step asks for a GPU
    assert not any("accelerator" in ex["container"].get("resources", {})
                   for ex in spec["deploymentSpec"]["executors"].values())


def test_paper_pipeline_references_secrets_by_name_only(tmp_path: Path) -> None:
    spec = compiled(tmp_path, "versavit")
    text = spec["_text"]
    platform = list(yaml.safe_load_all(text))[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    secret_envs = [e for name, ex in platform.items() for e in ex.get("secretAsEnv", []) if name != "exec-weights"]
    assert secret_envs and all(e["secretName"] == "minio-credentials" for e in secret_envs)
    # the hub token reaches the weights step only
    hub = [e for ex in platform.values() for e in ex.get("secretAsEnv", []) if e["secretName"] == "hf-token"]
    assert hub == [e for e in platform["exec-weights"]["secretAsEnv"] if e["secretName"] == "hf-token"]
    assert hub[0]["keyToEnv"] == [{"secretKey": "token", "envVar": "HF_TOKEN"}]
    keys = {kv["secretKey"]: kv["envVar"] for e in secret_envs for kv in e["keyToEnv"]}
    assert keys == {"access-key": "AWS_ACCESS_KEY_ID", "secret-key": "AWS_SECRET_ACCESS_KEY"}
    # GPU stages (labelling, evaluation) get GPUs, /dev/shm and the H20 node selector
    gpu_execs = [ex for ex in platform.values() if "nodeSelector" in ex]
    assert gpu_execs and all(ex["emptyDirMounts"][0]["mountPath"] == "/dev/shm" for ex in gpu_execs)
    assert "NVIDIA-H20" in text
    assert "retryPolicy" in text


def test_paper_pipeline_stages_weights_prepares_and_labels_before_training(tmp_path: Path) -> None:
    spec = compiled(tmp_path, "versavit")
    deps = _deps(spec)
    inner = next(t for t in spec["root"]["dag"]["tasks"].values() if "exit-handler" in t["componentRef"]["name"])
    body = spec["components"][inner["componentRef"]["name"]]["dag"]["tasks"]
    step = {body[n]["taskInfo"]["name"]: n for n in body}
    order = ["weights", "prepare", "label-depth", "label-masks", "label-describe", "label-embed", "warmup",
             "multitask", "evaluate-linear-probe", "report"]
    evaluators = {f"evaluate-{n}" for n in load_config(ROOT / "configs/paper.yaml").eval.evaluators}
    assert len(evaluators) == 9 and set(step) == {"open-run", *order, *evaluators}
    assert all(step["multitask"] in deps[step[e]] and step[e] in deps[step["report"]] for e in evaluators)
    for before, after in zip(order, order[1:], strict=False):
        assert step[before] in deps[step[after]], (before, after)
    # each prepare / label step fans out over labeling.workers (16) slices: a ParallelFor over 0..15
    for name in order[1:6]:
        loop = body[step[name]]
        assert json.loads(loop["parameterIterator"]["items"]["raw"]) == list(range(16))
        assert loop["iteratorPolicy"]["parallelismLimit"] == 16
        inner_task = next(iter(spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"].values()))
        executor = spec["deploymentSpec"]["executors"][spec["components"][inner_task["componentRef"]["name"]]
                                                       ["executorLabel"]]
        # prepare: the small CPU driver image; labelling: the labeler image (never the trainer's)
        image = "ghcr.io/versavit/labeler:0.1.0" if name.startswith("label") else "ghcr.io/versavit/driver:0.1.0"
        assert executor["container"]["image"] == image, name
        resources = executor["container"].get("resources", {})
        gpus = resources.get("accelerator", {}).get("resourceCount")
        assert gpus == ("1" if name.startswith("label") else None), (name, resources)
    # weights staged once: every step but the weights step loads with the hub offline
    env = {name: {e["name"]: e["value"] for e in ex["container"].get("env", [])}
           for name, ex in spec["deploymentSpec"]["executors"].items()}
    assert env.pop("exec-weights")["HF_HUB_OFFLINE"] == "0"
    assert env and all(e.get("HF_HUB_OFFLINE") == "1" for e in env.values())
    # what the label steps label, in order, for two datasets of different chains
    from versavit.config.schema import LABEL_KINDS
    from versavit.stages import dataset_label_chains

    chains = dataset_label_chains(load_config(ROOT / "configs/paper.yaml"))
    assert [n for n, _, _ in chains["depth"]][:2] == ["open-images", "objects365-depth"]
    objects365 = [(k, src, out) for k in LABEL_KINDS for n, src, out in chains.get(k, []) if n == "objects365-refseg"]
    assert [k for k, _, _ in objects365] == ["masks", "describe", "embed"]
    assert objects365[0][1] == "s3://versavit/data/objects365"  # reads the prepared shards
    assert objects365[1][1] == objects365[0][2] and objects365[2][1] == objects365[1][2]  # each reads the last
    assert objects365[-1][2] == "s3://versavit/data/refseg/objects365"  # the last writes `labelled`


def test_ablation_branches_share_data_and_warmup(tmp_path: Path) -> None:
    spec = compiled(tmp_path, "ablation", "configs/tiny.yaml")
    deps = _deps(spec)
    branches = [n for n in deps if n.startswith("train-")]
    assert len(branches) == 3 and all(deps[b] == {"train", "open-run"} for b in branches)
    assert set(branches) <= deps["evaluate"] and all(set(branches) <= deps[e] for e in EVALUATORS)
    # each branch trains its own task subset (Table 4), written into its own stage folder
    inner = next(t for t in spec["root"]["dag"]["tasks"].values() if "exit-handler" in t["componentRef"]["name"])
    body = spec["components"][inner["componentRef"]["name"]]["dag"]["tasks"]
    subsets = {}
    for name in branches:
        params = body[name]["inputs"]["parameters"]
        cfg = json.loads(params["config_json"]["runtimeValue"]["constant"])
        subsets[params["variant"]["runtimeValue"]["constant"]] = cfg["train"]["multitask"]["tasks"]
    assert subsets == {"caption": ["caption"], "caption-depth": ["caption", "depth"],
                       "all": ["caption", "depth", "refseg"]}


def test_cli_compile_writes_yaml(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.yaml"
    res = subprocess.run([sys.executable, "-m", "versavit.cli", "pipeline", "compile", "--config",
                          "configs/paper.yaml", "--output", str(out), "launch.image=registry.local/vv:9",
                          "launch.driver_image=registry.local/driver:9"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    spec = yaml.safe_load_all(out.read_text()).__next__()
    images = {ex["container"]["image"] for ex in spec["deploymentSpec"]["executors"].values()}
    assert "registry.local/driver:9" in images  # the image per step comes from the config
    assert "registry.local/vv:9" in out.read_text()  # the trainer image: in the embedded config, for the jobs


def test_recipes_pipeline_branches_run_their_stages_in_order(tmp_path: Path) -> None:
    spec = compiled(tmp_path, "recipes", "configs/tiny.yaml")
    deps = _deps(spec)
    inner = next(t for t in spec["root"]["dag"]["tasks"].values() if "exit-handler" in t["componentRef"]["name"])
    body = spec["components"][inner["componentRef"]["name"]]["dag"]["tasks"]
    chains: dict[str, list[str]] = {}
    recipes: dict[str, dict] = {}
    for name in (n for n in deps if n.startswith("train")):
        params = body[name]["inputs"]["parameters"]
        variant = params["variant"]["runtimeValue"]["constant"]
        chains.setdefault(variant, []).append(name)
        recipes[variant] = json.loads(params["config_json"]["runtimeValue"]["constant"])["train"]
    assert set(chains) == {"versavit", "versavit-synergy", "sailvit"}
    stage_of = {n: body[n]["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"] for v in chains
                for n in chains[v]}
    expected = {"versavit": ["warmup", "multitask"], "versavit-synergy": ["warmup", "multitask"],
                "sailvit": ["coarse", "fine-top1", "fine-top2", "knowledge"]}
    last = set()
    for variant, tasks in chains.items():
        # each branch is a chain: the first stage after labelling, every other after its predecessor
        first = [t for t in tasks if "label" in deps[t]]
        assert len(first) == 1
        order = first
        while len(order) < len(tasks):
            order.append(next(t for t in tasks if order[-1] in deps[t]))
        assert [stage_of[t] for t in order] == expected[variant]
        last.add(order[-1])
        assert all(not deps[t] & set(chains[o]) for o in chains if o != variant for t in tasks)  # branches apart
    # one evaluation, after the last stage of all three branches
    assert [n for n in deps if n.startswith("evaluate")] == ["evaluate"]  # one report
    assert len(last) == 3 and last <= deps["evaluate"] and all(last <= deps[e] for e in EVALUATORS)
    # the branches differ in their recipe only: synergy on in one, the SAILViT stages in another
    assert recipes["versavit"]["recipe"] is None and not recipes["versavit"]["multitask"]["synergy"]["enabled"]
    assert recipes["versavit-synergy"]["multitask"]["synergy"]["enabled"] is True
    assert [s["name"] for s in recipes["sailvit"]["recipe"]] == expected["sailvit"]


def test_full_pipeline_follows_an_explicit_recipe(tmp_path: Path) -> None:
    spec = compiled(tmp_path, "versavit", "configs/recipes/sailvit.yaml")
    deps = _deps(spec)
    assert set(deps) == {"open-run", "data", "data-check", "label", "train", "train-2", "train-3", "train-4",
                         "evaluate", *EVALUATORS}
    assert "label" in deps["train"] and "train" in deps["train-2"] and "train-3" in deps["train-4"]
    assert "train-4" in deps["evaluate"]
    with pytest.raises(ValueError, match="ablation"):
        compiled(tmp_path, "ablation", "configs/recipes/sailvit.yaml")


# ------------------------------------------------------------------------------------------------
# right-sized steps: image, CPU/memory and GPUs of each step come from the config


def _executors(spec: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """executor label -> its container; executor label -> its kubernetes platform settings."""
    docs = list(yaml.safe_load_all(spec["_text"]))
    containers = {name: ex["container"] for name, ex in spec["deploymentSpec"]["executors"].items()}
    return containers, docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _sizes(container: dict) -> tuple[str | None, str | None, str | None, str | None, str | None]:
    res = container.get("resources", {})
    return (res.get("resourceCpuRequest"), res.get("resourceCpuLimit"), res.get("resourceMemoryRequest"),
            res.get("resourceMemoryLimit"), res.get("accelerator", {}).get("resourceCount"))


def test_paper_pipeline_steps_are_right_sized(tmp_path: Path) -> None:
    """Driver steps (MLflow parent run, weights, train and the fine-tuning evaluators, which only create and watch
    their PyTorchJob; prepare) run in the small driver image with CPU/memory requests and no GPU or GPU-node
    selector; labelling and the inference evaluators run in the labeler image on 1 GPU each, the report in it
    without one; nothing runs in the trainer image (that is the jobs')."""
    spec = compiled(tmp_path, "versavit")
    containers, platform = _executors(spec)
    steps = _step_names(spec)
    executor = {name: spec["components"][
        spec["components"][_inner(spec)]["dag"]["tasks"][task]["componentRef"]["name"]]["executorLabel"]
        for name, task in steps.items() if name.startswith("evaluate-")}
    driver, labeler = "ghcr.io/versavit/driver:0.1.0", "ghcr.io/versavit/labeler:0.1.0"
    expected = {"exec-open-run": (driver, ("500m", "2", "2Gi", "2Gi", None)),
                "exec-close-run": (driver, ("500m", "2", "2Gi", "2Gi", None)),
                "exec-weights": (driver, ("500m", "2", "2Gi", "2Gi", None)),
                "exec-train": (driver, ("500m", "2", "2Gi", "2Gi", None)),
                "exec-train-2": (driver, ("500m", "2", "2Gi", "2Gi", None)),
                "exec-prepare": (driver, ("4", None, "16Gi", "16Gi", None)),
                "exec-evaluate": (labeler, ("500m", "2", "2Gi", "2Gi", None))}  # the report
    expected |= {executor[f"evaluate-{n}"]: (driver, ("500m", "2", "2Gi", "2Gi", None))
                 for n in ("finetune-depth", "refseg-finetune", "retrieval", "vqa")}  # they launch their jobs
    expected |= {executor[f"evaluate-{n}"]: (labeler, ("8", None, "64Gi", "64Gi", "1"))
                 for n in ("linear-probe", "zero-shot-depth", "da2k", "refseg", "correspondence")}
    expected |= {name: (labeler, ("8", None, "64Gi", "64Gi", "1")) for name in containers
                 if name.startswith("exec-label-datasets")}
    assert set(containers) == set(expected)
    for name, (image, sizes) in expected.items():
        assert (containers[name]["image"], _sizes(containers[name])) == (image, sizes), name
        on_gpu = sizes[-1] is not None
        # only GPU steps are pinned to the GPU nodes (and get /dev/shm); drivers schedule anywhere
        assert ("nodeSelector" in platform.get(name, {})) == on_gpu, name
        assert bool(platform.get(name, {}).get("emptyDirMounts")) == on_gpu, name
    assert not any("trainer" in c["image"] for c in containers.values())


def test_step_images_and_sizes_follow_the_config(tmp_path: Path) -> None:
    spec = compiled(tmp_path, "versavit", "configs/tiny.yaml", "launch.backend=pytorchjob",
                    "launch.resources.gpus_per_node=8", "launch.driver_image=registry.local/driver:7",
                    "launch.labeler_image=registry.local/labeler:7", "launch.step_resources.driver.memory=3Gi",
                    "launch.step_resources.driver.cpu_limit=null", "launch.step_resources.gpu.cpu=12", "eval.gpus=1",
                    "labeling.gpus_per_worker=2")
    containers, _ = _executors(spec)
    for name in ("exec-open-run", "exec-data", "exec-train", "exec-train-2"):
        assert containers[name]["image"] == "registry.local/driver:7", name
        assert _sizes(containers[name]) == ("500m", None, "3Gi", "3Gi", None), name
    assert containers["exec-evaluator"]["image"] == containers["exec-label"]["image"] == "registry.local/labeler:7"
    assert _sizes(containers["exec-evaluator"]) == ("12", None, "64Gi", "64Gi", "1")  # eval.gpus
    with pytest.raises(ConfigError, match="eval.gpus"):  # one device: more would be requested and left idle
        load_config(ROOT / "configs/tiny.yaml", ["eval.gpus=4"])
    assert _sizes(containers["exec-label"]) == ("12", None, "64Gi", "64Gi", "2")  # labeling.gpus_per_worker
    with pytest.raises(ConfigError, match="memory"):
        load_config(ROOT / "configs/paper.yaml", ["launch.step_resources.driver.memory=2GB"])


def test_local_backend_trains_in_the_step_pod(tmp_path: Path) -> None:
    """launch.backend local on a cluster: the train step runs torchrun itself, so it gets the trainer image,
    launch.resources and the node's GPUs (with gpus_per_node 0, none: test_full_pipeline_stages_in_order)."""
    spec = compiled(tmp_path, "versavit", "configs/tiny.yaml", "launch.resources.gpus_per_node=2",
                    "launch.image=registry.local/trainer:7")
    containers, _ = _executors(spec)
    assert containers["exec-train"]["image"] == "registry.local/trainer:7"
    assert _sizes(containers["exec-train"]) == ("8", None, "64Gi", "64Gi", "2")
    assert containers["exec-data"]["image"] == "ghcr.io/versavit/driver:0.1.0"
    assert _sizes(containers["exec-label"])[-1] == "1"
