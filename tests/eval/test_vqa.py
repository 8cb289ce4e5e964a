"""VQA with the frozen backbone in an MLLM (versavit.eval.vqa, evaluator "vqa"): the answer scoring, the two training
stages, accuracy above chance with a backbone that sees and at chance with features of other images, the frozen
backbone, VLMEvalKit's prediction file and the lmms-eval adapter.

The world: one object per scene (112 px) and only the colour questions ("What color is the cube?"), whose answer is
visible in the image. A random tiny tower cannot be trusted to carry colour (its random 14x14 patch projection
scrambles a small object's colour with the checkerboard floor: the MLLM stayed at chance on it), so the backbone
that "sees" is a random tiny tower whose patch embedding has three channels set to each patch's mean R, G and B
(`_seeing_backbone`; every other weight random). The blind baseline is the same tower fed other images
(`OtherImages`: features of images never asked about), trained and scored by the same protocol.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from eval_helpers import eval_config
from torch import nn

from versavit.config.schema import SyntheticConfig
from versavit.data.build import build_synthetic
from versavit.data.synthetic import render_sample
from versavit.eval.candidates import Candidate
from versavit.eval.datasets import Benchmark, open_benchmark
from versavit.eval.evaluators import EvalContext, get
from versavit.eval.vqa import lmms_adapter
from versavit.eval.vqa.data import training_batches
from versavit.eval.vqa.metrics import AnswerPrior, accuracy, exact_match, normalize_answer
from versavit.eval.vqa.model import VqaModel
from versavit.eval.vqa.predictions import PREDICTION_COLUMNS, read_predictions
from versavit.eval.vqa.protocol import evaluation_questions, load_result, result_path, vqa_eval
from versavit.eval.vqa.train import VqaSettings, build_vqa_model, lr_factor, train_stage
from versavit.layout import synthetic_root
from versavit.models.backbone import VisionBackbone

# one worker runs the module (make test: xdist), so its trained models (module fixtures) are built once
pytestmark = pytest.mark.xdist_group("vqa")

WORLD = ("data.synthetic={num_train: 384, num_val: 64, image_size: 112, min_objects: 1, max_objects: 1, "
         "samples_per_shard: 64}")
SIZES = ("train.resolution={caption_max: 112, caption_min: 56, depth: 56, refseg: 56}",
         "model.heads.caption.tiny_llm_hidden=64")
SCHEDULE = ("eval.vqa={stage1_steps: 10, stage2_steps: 300, stage1_lr: 3.0e-3, stage2_lr: 3.0e-3, batch_size: 16, "
            "qa_kinds: [color], log_every: 100}")
# VLMEvalKit's prediction columns (docs/en/Development.md's VQA fields without `image`, + `prediction` appended by
# vlmeval/inference.py infer_data_job): what the evaluator must write, spelled out independently of the module
VLMEVALKIT_COLUMNS = ("index", "question", "answer", "category", "prediction")


def _seeing_backbone(cfg: Any, seed: int = 3) -> VisionBackbone:
    """A random tiny tower whose patch embedding's channels 0-2 are each patch's mean R, G, B (scaled to the other
    channels' size); everything else random."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = VisionBackbone.build(cfg.model.backbone).eval()
    with torch.no_grad():
        w = backbone.tower.patch_embed.proj.weight  # [D, 3, 2, 14, 14]
        w[:3] = 0
        for c in range(3):
            w[c, c] = 4.0 / w[0, 0].numel()
    return backbone


class OtherImages(nn.Module):
    """A backbone fed other images: each input is replaced by a random one of `pool` (resized to its size), so its
    features say nothing about the image asked about."""

    def __init__(self, backbone: VisionBackbone, pool: list[np.ndarray], seed: int = 0) -> None:
        super().__init__()
        self.inner = backbone
        self.pool = pool
        self.rng = np.random.default_rng(seed)
        self.patch_size, self.merge_size, self.embed_dim = backbone.patch_size, backbone.merge_size, backbone.embed_dim

    def forward(self, images: list[torch.Tensor], merged: bool = True) -> Any:
        from versavit.data.tasks import image_tensor

        other = [image_tensor(self.pool[int(self.rng.integers(len(self.pool)))], tuple(im.shape[-2:])).to(im)
                 for im in images]
        return self.inner(other, merged=merged)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("vqa")
    cfg = eval_config(workdir, WORLD, *SIZES, SCHEDULE, "tracking.enabled=false")
    build_synthetic(synthetic_root(cfg.workdir), SyntheticConfig(**cfg.data.synthetic.model_dump()))
    backbone = _seeing_backbone(cfg)
    return {"cfg": cfg, "bench": open_benchmark("synthetic", cfg.workdir), "workdir": workdir,
            "cand": Candidate("seeing", "random tiny tower, colour-mean stem", backbone=backbone),
            "initial": {k: v.clone() for k, v in backbone.state_dict().items()}}


@pytest.fixture(scope="module")
def trained(world: dict[str, Any]) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: built before the autouse one-thread fixture applies
    cfg = world["cfg"].model_copy(deep=True)
    cfg.eval.vqa.lmms_tasks = ["local"]  # scored by lmms-eval as well: its own questions as a local task
    try:
        evaluator = get("vqa")(EvalContext(cfg, world["workdir"] / "cache", world["workdir"] / "report",
                                           device="cpu"))
        result = evaluator.run(world["cand"], world["bench"])
    finally:
        torch.set_num_threads(threads)
    return {"evaluator": evaluator, "result": result}


@pytest.fixture(scope="module")
def blind(world: dict[str, Any]) -> Any:
    pool = [render_sample(99, "test", i, image_size=112, min_objects=1, max_objects=1).image for i in range(32)]
    cand = Candidate("other-images", "the seeing tower fed other images",
                     backbone=OtherImages(_seeing_backbone(world["cfg"]), pool))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return vqa_eval(cand, world["bench"], world["cfg"], device="cpu")
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- scoring


def test_normalisation_exact_match_and_the_blind_guess() -> None:
    assert normalize_answer("The Red.") == "red" and normalize_answer("  Two\n") == "2"
    assert normalize_answer("a blue cube!") == "blue cube" and normalize_answer("yes, it is") == "yes it is"
    assert normalize_answer("none") == "0" and normalize_answer("3.5") == "3.5"  # a decimal point stays
    assert exact_match("Green.", "green") == 1.0 and exact_match("greenish", "green") == 0.0

    answers = ["red", "green", "blue", "red", "3", "yes"] * 5
    assert accuracy(answers, answers) == 1.0
    shuffled = list(np.random.default_rng(0).permutation(answers))
    assert accuracy(shuffled, answers) < 0.5
    assert accuracy(["zebra"] * len(answers), answers) == 0.0

    prior = AnswerPrior()
    prior.update(["red", "Red", "blue", "2", "two", "3"], ["color", "color", "color", "count", "count", "count"])
    assert prior.guess("color") == "red" and prior.guess("count") == "2" and prior.guess("shape") == ""
    assert prior.accuracy(["red", "blue", "2"], ["color", "color", "count"]) == pytest.approx(2 / 3)
    assert AnswerPrior.from_dict(prior.as_dict()).as_dict() == prior.as_dict()


# ---------------------------------------------------------------------------------------------- training


def test_one_epoch_streams_every_pair_once_and_the_schedule_decays(world: dict[str, Any]) -> None:
    urls = [world["bench"].train.url]
    for keep in (0, 10_000):  # streamed every epoch / read once and kept
        batches = list(training_batches(urls, "vqa", 16, seed=5, shuffle_buffer=32, kinds=["color"], epochs=2,
                                        keep=keep))
        seen = [(e.key, e.question) for b, _ in batches for e in b]
        # one colour question per scene, each once an epoch (the shuffle buffer carries a few over the boundary)
        assert len(seen) == 2 * 384 and set(Counter(seen).values()) == {2} and len(set(seen[:384])) > 350
        assert all(len(b) == 16 for b, _ in batches) and batches[-1][1] == 2 * 384  # samples read
        assert seen[:384] != seen[384:]  # reshuffled per epoch
        assert all(e.category == "color" for b, _ in batches for e in b)
    captions = next(training_batches(urls, "caption", 4, seed=0, shuffle_buffer=0))[0]
    assert all(e.question == "Describe the image." and e.answer.startswith("A room with 1 object") for e in captions)
    assert lr_factor(0.0, 0.1) == pytest.approx(1e-3) and lr_factor(0.05, 0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1) == pytest.approx(1.0) and lr_factor(1.0, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0.7, 0.1, "constant") == 1.0


def test_processes_read_disjoint_shares_that_make_the_whole(world: dict[str, Any]) -> None:
    """Data-parallel VQA (eval.vqa.processes): each process streams its own share of a stage's data, by shard when
    there are enough shards (6 here), else by sample."""
    from versavit.eval.vqa.data import examples

    urls = [world["bench"].train.url]
    whole = [(e.key, e.question) for e, _ in examples(urls, "vqa", ["color"], seed=3, shuffle_buffer=8)]
    assert len(whole) == 384
    for procs in (2, 8):  # 2: three shards each; 8: more processes than shards, every 8th sample
        shares = [[(e.key, e.question) for e, _ in examples(urls, "vqa", ["color"], seed=3, shuffle_buffer=8,
                                                             rank=r, world=procs)] for r in range(procs)]
        assert sorted(x for share in shares for x in share) == sorted(whole)  # disjoint, and the whole together
        assert all(abs(len(share) - 384 / procs) <= 64 for share in shares)
        sizes = [len(share) for share in shares]
        assert (sizes == [192, 192]) if procs == 2 else (sizes == [48] * 8)


def test_stage1_trains_the_projector_only_and_stage2_the_llm(world: dict[str, Any]) -> None:
    cfg = world["cfg"]
    settings = VqaSettings.from_config(cfg)
    model = build_vqa_model(world["cand"], cfg, settings)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def moved(prefix: str) -> bool:
        now = model.state_dict()
        return any(not torch.equal(now[k], state[k]) for k in state if k.startswith(prefix))

    urls = [world["bench"].train.url]
    train_stage(model, 1, urls, "caption", model.head.projector_parameters(), 1e-2, 3, settings)
    assert moved("head.projector.") and not moved("head.llm.") and not moved("backbone.")
    train_stage(model, 2, urls, "vqa", model.head.projector_parameters() + model.head.llm_parameters(), 1e-2, 3,
                settings)
    assert moved("head.llm.") and not moved("backbone.")
    assert not any(p.requires_grad for p in model.parameters())  # nothing left trainable after a stage


def test_answers_above_chance_with_a_seeing_backbone_and_at_chance_without(trained: dict[str, Any],
                                                                           blind: Any, world: dict[str, Any]) -> None:
    result = trained["result"]
    acc, chance = result.value("accuracy"), result.value("chance")
    questions = evaluation_questions(world["bench"], VqaSettings.from_config(world["cfg"]))
    assert result.artifacts["questions"] == len(questions) == 64  # one colour question per scene
    # chance: the commonest colour of stage 2's answers, scored on the evaluation questions
    prior = AnswerPrior.from_dict(result.artifacts["prior"])
    assert set(prior.counts) == {"color"}
    guess = prior.guess("color")
    assert chance == pytest.approx(np.mean([q.answer == guess for q in questions]))
    assert 0.05 < chance < 0.35  # 7 colours
    assert blind.value("chance") == pytest.approx(chance)  # same data, same seeds
    assert acc >= chance + 0.2, (acc, chance)
    assert blind.value("accuracy") <= chance + 0.12, (blind.value("accuracy"), chance)
    assert acc >= blind.value("accuracy") + 0.2
    assert result.value("acc_color") == pytest.approx(acc)
    s1, s2 = result.curves["stage1_loss"], result.curves["stage2_loss"]
    assert len(s1) == 10 and len(s2) == 300 and np.mean(s2[-20:]) < 0.5 * np.mean(s2[:20])
    # the seeing model's loss ends lower than the blind one's (it uses the image)
    assert np.mean(s2[-50:]) < np.mean(blind.curves["stage2_loss"][-50:])


def test_the_backbone_stays_frozen(trained: dict[str, Any], world: dict[str, Any]) -> None:
    result = trained["result"]
    assert result.artifacts["backbone_unchanged"] is True
    state = world["cand"].backbone.state_dict()  # the candidate's own module: never touched
    assert all(torch.equal(state[k], world["initial"][k]) for k in state)
    saved = VqaModel.load(result.artifacts["model"])  # the trained MLLM's backbone is the candidate's, bit for bit
    assert all(torch.equal(v, world["initial"][k]) for k, v in saved.backbone.state_dict().items())
    fresh = build_vqa_model(world["cand"], world["cfg"], VqaSettings.from_config(world["cfg"]))
    trained_llm, fresh_llm = saved.head.llm.state_dict(), fresh.head.llm.state_dict()
    assert any(not torch.equal(trained_llm[k], fresh_llm[k]) for k in fresh_llm)  # stage 2 trained the LLM


# ---------------------------------------------------------------------------------------------- outputs


def test_predictions_file_has_vlmevalkit_columns(trained: dict[str, Any]) -> None:
    result = trained["result"]
    path = Path(result.artifacts["predictions"])
    assert path.name == "VersaViT-seeing_synthetic-VQA.tsv"  # {model_name}_{dataset_name}.tsv
    assert PREDICTION_COLUMNS == VLMEVALKIT_COLUMNS
    header = path.read_text(encoding="utf-8").splitlines()[0]
    assert header == "\t".join(f'"{c}"' for c in VLMEVALKIT_COLUMNS)  # dump_tsv quotes every field
    rows = read_predictions(path)
    assert [int(r["index"]) for r in rows] == list(range(64))
    assert all(r["category"] == "color" and r["question"].startswith("What color is") for r in rows)
    assert accuracy([r["prediction"] for r in rows], [r["answer"] for r in rows]) == pytest.approx(
        result.value("accuracy"))
    loaded = load_result(result_path(Path(result.artifacts["model"]).parents[1], "synthetic", "seeing"))
    assert loaded.as_dict() == pytest.approx(result.as_dict())
    assert loaded.curves["stage2_loss"] == result.curves["stage2_loss"]
    assert len(loaded.artifacts["examples"]["image"]) == len(result.artifacts["examples"]["image"])


def test_evaluator_registry_and_figures(trained: dict[str, Any], blind: Any, world: dict[str, Any],
                                        tmp_path: Path) -> None:
    evaluator = trained["evaluator"]
    assert evaluator.kind == "training" and evaluator.name == "vqa"
    assert evaluator.applies_to(world["bench"])
    depth_only = Benchmark("nyu", "/nowhere", eval=object(), train=None, tasks=("depth",))  # type: ignore[arg-type]
    assert not evaluator.applies_to(depth_only)
    assert list(evaluator.columns()) == ["accuracy", "chance"]
    assert "stage 1" in evaluator.protocol_note() and evaluator.settings()["qa_kinds"] == ["color"]
    files = evaluator.figures([trained["result"], blind], tmp_path)
    assert [f.name for f in files] == ["vqa_synthetic.png", "vqa_loss_synthetic.png"]
    assert all(f.stat().st_size > 1000 for f in files)


# ---------------------------------------------------------------------------------------------- lmms-eval


@dataclasses.dataclass
class Request:
    """lmms-eval's Instance as the model sees it: `args` (lmms_eval/api/instance.py)."""

    args: tuple


def _yaml_with_functions(path: Path) -> dict[str, Any]:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    return yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 - SafeLoader subclass


def test_lmms_adapter_scores_what_the_evaluator_scores(trained: dict[str, Any], world: dict[str, Any],
                                                       tmp_path: Path) -> None:
    result = trained["result"]
    questions = evaluation_questions(world["bench"], VqaSettings.from_config(world["cfg"]))
    task_yaml = lmms_adapter.write_lmms_task(questions, tmp_path / "task", max_new_tokens=16)
    config = _yaml_with_functions(task_yaml)
    assert config["task"] == task_yaml.stem and config["output_type"] == "generate_until"
    assert config["dataset_path"] == "json" and Path(config["dataset_kwargs"]["data_files"]["test"]).is_file()
    functions = {}
    for key in ("doc_to_visual", "doc_to_text", "process_results"):
        kind, ref = config[key]
        module, _, name = ref.rpartition(".")
        functions[key] = getattr(importlib.import_module(module), name)  # lmms-eval's absolute-import fallback
        assert kind == "function" and functions[key] is getattr(lmms_adapter, key)
    docs = lmms_adapter.read_task_docs(task_yaml)
    assert [d["question"] for d in docs] == [q.question for q in questions]

    # the model as lmms-eval builds it from `--model_args pretrained=...` (create_from_arg_string)
    lm = lmms_adapter.VersaViTVQA.create_from_arg_string(f"pretrained={result.artifacts['model']}",
                                                         {"batch_size": 8, "device": "cpu"})
    task = config["task"]
    lm.task_dict = {task: {"test": docs}}
    requests = [Request((functions["doc_to_text"](doc), dict(config["generation_kwargs"]), functions["doc_to_visual"],
                         i, task, "test")) for i, doc in enumerate(docs)]
    predictions = lm.generate_until(requests)
    scores = [functions["process_results"](doc, [p])[lmms_adapter.TASK_METRIC] for doc, p in zip(docs, predictions,
                                                                                                 strict=True)]
    assert np.mean(scores) == pytest.approx(result.value("accuracy"))
    tsv = {int(r["index"]): r["prediction"] for r in read_predictions(Path(result.artifacts["predictions"]))}
    assert predictions == [tsv[d["index"]] for d in docs]

    # loglikelihood: the model's own greedy answer is greedy and likelier than another colour
    own = lm.loglikelihood([Request((docs[i]["question"], predictions[i], functions["doc_to_visual"], i, task,
                                     "test")) for i in range(8)])
    other = [p for p in ("red", "green", "blue", "yellow") if p != predictions[0]][0]
    worse = lm.loglikelihood([Request((docs[0]["question"], other, functions["doc_to_visual"], 0, task, "test"))])
    assert all(greedy for _, greedy in own) and own[0][0] > worse[0][0] and not worse[0][1]
    # doc_to_target given as a callable (lmms-eval's loglikelihood tasks)
    by_target = lm.loglikelihood([Request((docs[0]["question"], lambda doc: doc["answer"],
                                           functions["doc_to_visual"], 0, task, "test"))])
    direct = lm.loglikelihood([Request((docs[0]["question"], docs[0]["answer"], functions["doc_to_visual"], 0, task,
                                        "test"))])
    assert by_target == direct


def test_lmms_eval_scores_the_trained_mllm_end_to_end(trained: dict[str, Any], world: dict[str, Any],
                                                      tmp_path: Path) -> None:
    """lmms-eval itself (simple_evaluate, its TaskManager, `datasets` reading the local JSON-lines task, its
    aggregation) on the saved MLLM: the same answers and score as the evaluator's, logged among its metrics."""
    from PIL import ImageFile

    assert lmms_adapter.HAVE_LMMS_EVAL  # the real lmms-eval, from the lock
    result = trained["result"]
    task = "versavit_synthetic_vqa"
    # inside the evaluator (eval.vqa.lmms_tasks: [local]): the score is a metric of the result
    assert result.value(f"lmms_{task}_exact_match") == pytest.approx(result.value("accuracy"))
    assert result.artifacts["lmms_eval"] == {task: {"exact_match": pytest.approx(result.value("accuracy"))}}
    written = Path(result.artifacts["model"]).parent / "lmms-task" / f"{task}.yaml"
    assert written.is_file() and (written.parent / "hf-datasets-cache").is_dir()  # datasets' cache kept local

    # from the saved model folder, as `--model versavit_vqa --model_args pretrained=...` would load it
    questions = evaluation_questions(world["bench"], VqaSettings.from_config(world["cfg"]))[:24]
    task_yaml = lmms_adapter.write_lmms_task(questions, tmp_path / "task", task="versavit_first24", max_new_tokens=16)
    raw = lmms_adapter.run_lmms_eval(result.artifacts["model"], task_yaml, batch_size=8)
    samples = raw["samples"]["versavit_first24"]
    tsv = {int(r["index"]): r for r in read_predictions(Path(result.artifacts["predictions"]))}
    answers = {int(s["doc"]["index"]): s["filtered_resps"][0] for s in samples}
    assert sorted(answers) == list(range(24))
    assert all(answers[i] == tsv[i]["prediction"] for i in answers)  # lmms-eval's answers are the evaluator's
    expected = np.mean([exact_match(tsv[i]["prediction"], tsv[i]["answer"]) for i in range(24)])
    assert lmms_adapter.task_scores(raw) == {"versavit_first24": {"exact_match": pytest.approx(expected)}}
    # lmms-eval's import turns on PIL's LOAD_TRUNCATED_IMAGES for the process; the adapter turns it off again, so
    # the readers still skip and count truncated images as corrupt
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
