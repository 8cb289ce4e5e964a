"""lmms-eval adapter: the MLLM the `vqa` evaluator trained (a saved `VqaModel`) as an lmms-eval model, and a local
lmms-eval task built from the evaluator's questions (the synthetic world's, a VLMEvalKit benchmark's).

lmms-eval's interface (EvolvingLMMs-Lab/lmms-eval, as released in lmms_eval 0.7.3 on PyPI):

- lmms_eval/api/model.py: a model subclasses `lmms` and implements `generate_until(requests)`,
  `loglikelihood(requests)` and `generate_until_multi_round(requests)`; `create_from_arg_string("k=v,...",
  {"batch_size", "device", ...})` builds it from the command line; `task_dict[task][split][doc_id]` (set by the
  evaluator) holds the documents.
- lmms_eval/api/task.py `construct_requests`: a generate_until request's `args` are `(context, generation_kwargs,
  doc_to_visual, doc_id, task, split)`; a loglikelihood request's `(context, continuation or doc_to_target,
  doc_to_visual, doc_id, task, split)`; `process_results(doc, [prediction])` scores one document.
- lmms_eval/models/__init__.py: models are looked up in `MODEL_REGISTRY_V2` (a `ModelManifest(model_id,
  simple_class_path)`, or the entry-point group `lmms_eval.models`); `register_lmms_model()` adds this one as
  "versavit_vqa".
- lmms_eval/utils.py `import_function`: a task YAML's `!function a.b.f` is a file next to the YAML or, failing that,
  an importable module, so the local task points at this module's `doc_to_visual`, `doc_to_text` and
  `process_results`; `TaskManager(include_path=folder)` finds the YAML; the documents are a local JSON-lines file
  read by `datasets.load_dataset("json", data_files=...)` (no hub download).

The model answers as the evaluator scores it: the question as the prompt, greedy decoding, the caption head's chat
template; `process_results` scores with the evaluator's rule (versavit.eval.vqa.metrics.score: exact match with any
answer that counts, the option letter for a multiple-choice question, whose options and alternatives the task's
documents carry as JSON strings), so lmms-eval's mean over the task equals the evaluator's accuracy on the same
questions. The metric keeps its name, `exact_match`, whatever the question's rule.

lmms-eval is optional: without it installed, this module still imports (a stand-in base class with lmms'
constructor state), so the adapter's methods can be called directly with Instance-like objects (anything with
`args`); `run_lmms_eval` needs lmms-eval itself (the lock has it: extra `lmms-eval`, without the dependencies of
lmms-eval's other models and tasks, requirements/overrides.txt).

The `vqa` evaluator calls `run_lmms_eval` on `eval.vqa.lmms_tasks` after training (`local`: its own evaluation
questions as a task written by `write_lmms_task`) and logs `task_scores` as its metrics lmms_<task>_<metric>.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from versavit.eval.vqa.data import QAExample
from versavit.eval.vqa.metrics import score
from versavit.eval.vqa.model import VqaModel

MODEL_NAME = "versavit_vqa"
TASK_METRIC = "exact_match"



@contextlib.contextmanager
def _pil_settings_kept() -> Iterator[None]:
    """lmms-eval's import (lmms_eval/api/task.py) sets PIL's ImageFile.LOAD_TRUNCATED_IMAGES for the whole process,
    after which a truncated image decodes silently instead of being skipped and counted as corrupt by versavit's
    readers: put it back as it was."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _one_process() -> contextlib.AbstractContextManager:
    """lmms-eval splits its documents over the processes named by RANK / WORLD_SIZE (torchrun's variables); the
    vqa job's data-parallel processes each score the whole task with the same weights, so lmms-eval does not see
    them (unset, as in a plain process: set to 1, accelerate would try to join a process group)."""
    from versavit.environ import environment

    return environment({"RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None})


try:  # lmms-eval installed: the real base class
    with _pil_settings_kept():
        from lmms_eval.api.model import lmms as _Base

    HAVE_LMMS_EVAL = True
except ImportError:  # not installed: the state lmms.__init__ sets, so that the methods run all the same
    HAVE_LMMS_EVAL = False

    class _Base:  # type: ignore[no-redef]
        is_simple = True

        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1
            self.task_dict: dict[str, Any] = {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> Any:
            args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
            return cls(**args, **{k: v for k, v in (additional_config or {}).items() if v is not None})


def _first_image(visuals: Any) -> np.ndarray | None:
    """The first image of what a task's doc_to_visual returns (PIL images, arrays, possibly nested lists)."""
    while isinstance(visuals, list | tuple):
        if not visuals:
            return None
        visuals = visuals[0]
    if visuals is None:
        return None
    if hasattr(visuals, "convert"):  # a PIL image
        visuals = visuals.convert("RGB")
    return np.asarray(visuals, dtype=np.uint8)


def _cut(text: str, until: Sequence[str]) -> str:
    """The generation up to the first stop string (lmms-eval's `until`)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


class VersaViTVQA(_Base):
    """A saved VqaModel (`pretrained`: the folder the vqa evaluator wrote, `<benchmark>-<backbone>/model`)."""

    is_simple = True
    # lmms-eval builds an accelerate Accelerator for a model without one; it uses it only to synchronise several
    # processes, and this model is scored by one (_one_process)
    accelerator = None

    def __init__(self, pretrained: str | None = None, device: str | None = None, batch_size: int | str = 1,
                 max_new_tokens: int | str | None = None, model: VqaModel | None = None, **kwargs: Any) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("versavit_vqa needs pretrained=<folder of a saved VQA model>")
            model = VqaModel.load(pretrained, device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval()
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens else model.max_new_tokens

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy answers, in request order; each cut at its `until` strings."""
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start: start + self.batch_size]]
            images = [_first_image(to_visual(self._doc(task, split, doc_id)))
                      for _, _, to_visual, doc_id, task, split in chunk]
            longest = max(int((kw or {}).get("max_new_tokens") or self.max_new_tokens) for _, kw, *_ in chunk)
            answers = self.model.answer(images, [ctx for ctx, *_ in chunk], longest)
            for (_, kw, *_), text in zip(chunk, answers, strict=True):
                until = (kw or {}).get("until") or []
                out.append(_cut(text, [until] if isinstance(until, str) else until).strip())
        return out

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(log p(continuation | image, context), whether greedy decoding gives exactly the continuation)."""
        out = []
        for context, target, to_visual, doc_id, task, split in (r.args for r in requests):
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            out.append(self.model.loglikelihood(_first_image(to_visual(doc)), context, str(continuation)))
        return out

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("versavit_vqa answers single-turn questions only")


def register_lmms_model() -> None:
    """Make `--model versavit_vqa` known to lmms-eval (its v2 registry; the class path of this module)."""
    with _pil_settings_kept():
        from lmms_eval.models import MODEL_REGISTRY_V2
        from lmms_eval.models.registry_v2 import ModelManifest

    MODEL_REGISTRY_V2.register_manifest(
        ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.VersaViTVQA"), overwrite=True)


# ------------------------------------------------------------------------------------------------
# the local task (documents: one JSON line per question; images as PNG files beside them)


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    from PIL import Image

    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    return str(doc["question"])


def _json_field(doc: dict[str, Any], name: str, empty: Any) -> Any:
    """A document's options / answers (written as JSON strings: `datasets` would make a struct of the options)."""
    value = doc.get(name)
    if isinstance(value, str):
        return json.loads(value) if value else empty
    return value if value is not None else empty


def process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """The evaluator's score of the prediction (versavit.eval.vqa.metrics.score)."""
    return {TASK_METRIC: score(results[0] if results else "", str(doc["answer"]), _json_field(doc, "options", {}),
                               _json_field(doc, "answers", []))}


def _task_yaml(task: str, docs: Path, max_new_tokens: int) -> str:
    fn = f"!function {__name__}"
    return "\n".join([
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(docs))}",
        f"  cache_dir: {json.dumps(str(docs.parent / 'hf-datasets-cache'))}",  # datasets' cache beside the task
        "test_split: test",
        "output_type: generate_until",
        f"doc_to_visual: {fn}.doc_to_visual",
        f"doc_to_text: {fn}.doc_to_text",
        "doc_to_target: answer",
        "generation_kwargs:",
        f"  max_new_tokens: {max_new_tokens}",
        "  do_sample: false",
        f"process_results: {fn}.process_results",
        "metric_list:",
        f"  - metric: {TASK_METRIC}",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 0.0",
        "",
    ])


def write_lmms_task(examples: Iterable[QAExample], folder: str | Path, task: str = "versavit_synthetic_vqa",
                    max_new_tokens: int = 16) -> Path:
    """A local lmms-eval task of `examples` in `folder`: images/<index>.png, docs.jsonl ({index, question, answer,
    category, image, options, answers}: options and answers as JSON strings) and <task>.yaml. Returns the YAML's
    path (its folder is TaskManager's include_path)."""
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    docs = folder / "docs.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for i, ex in enumerate(examples):
            index = ex.index if ex.index >= 0 else i
            image = folder / "images" / f"{index:06d}.png"
            if not image.exists():
                Image.fromarray(np.asarray(ex.image, dtype=np.uint8)).save(image)
            f.write(json.dumps({"index": index, "question": ex.question, "answer": ex.answer,
                                "category": ex.category, "image": str(image.resolve()),
                                "options": json.dumps(ex.options), "answers": json.dumps(list(ex.answers))}) + "\n")
    path = folder / f"{task}.yaml"
    path.write_text(_task_yaml(task, docs.resolve(), max_new_tokens))
    return path


def read_task_docs(yaml_path: str | Path) -> list[dict[str, Any]]:
    """The documents of a task written by `write_lmms_task`, in order."""
    docs = Path(yaml_path).parent / "docs.jsonl"
    return [json.loads(line) for line in docs.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_lmms_eval(model: str | Path | VqaModel, tasks: str | Path | Sequence[str | Path], device: str = "cpu",
                  batch_size: int = 8, limit: int | None = None) -> dict[str, Any]:
    """lmms-eval's own evaluator (`simple_evaluate`) on `tasks`: task YAMLs written by `write_lmms_task` (their
    folders as the task path) and/or task names of lmms-eval's registry (its built-in tasks, which lmms-eval
    downloads from the hub). Returns lmms-eval's results dict. Needs lmms-eval (extra `lmms-eval`)."""
    try:
        with _pil_settings_kept():
            from lmms_eval.evaluator import simple_evaluate
            from lmms_eval.tasks import TaskManager
    except ImportError as e:
        raise RuntimeError(f"scoring with lmms-eval needs lmms-eval installed (pip install 'versavit[lmms-eval]' "
                           f"with the lock's versions: make setup does): {e}") from e

    tasks = [tasks] if isinstance(tasks, str | Path) else list(tasks)
    local = [Path(t) for t in tasks if str(t).endswith((".yaml", ".yml"))]
    names = [p.stem for p in local] + [str(t) for t in tasks if not str(t).endswith((".yaml", ".yml"))]
    register_lmms_model()
    lm = VersaViTVQA(model=model if isinstance(model, VqaModel) else VqaModel.load(model, device),
                     batch_size=batch_size)
    folders = sorted({str(p.parent) for p in local})
    # lmms-eval's own tasks are indexed only when a registry task is asked for (indexing them all takes seconds)
    with _pil_settings_kept(), _one_process():
        manager = TaskManager(include_path=folders or None, include_defaults=len(local) < len(tasks))
        return simple_evaluate(model=lm, tasks=names, task_manager=manager, batch_size=batch_size, device=device,
                               limit=limit, log_samples=True, bootstrap_iters=0)


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lmms-eval's results dict: the numeric metrics (`"<metric>,<filter>"` keys, the
    filter dropped when it is lmms-eval's default "none"), without their standard errors."""
    out: dict[str, dict[str, float]] = {}
    for task, row in (results.get("results") or {}).items():
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or key == "alias" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            out.setdefault(task, {})[metric if filt in ("", "none") else f"{metric}_{filt}"] = float(value)
    return out


__all__ = ["HAVE_LMMS_EVAL", "MODEL_NAME", "TASK_METRIC", "VersaViTVQA", "doc_to_text", "doc_to_visual",
           "process_results", "read_task_docs", "register_lmms_model", "run_lmms_eval", "task_scores",
           "write_lmms_task"]
