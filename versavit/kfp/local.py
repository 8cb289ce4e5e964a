"""Running a pipeline on this machine: the KFP pipeline (pipelines/) under KFP's local runner, one
MLflow parent run with a nested run per stage. Stages meet at URLs and manifests.

The console stays quiet and live: one line per step when it ends (name, status, wall time, its key output),
training progress as it happens (step, loss, samples/s, ETA: rank 0's lines, which the torchrun launcher
streams through the step's output), warnings and errors; at the end the comparison, the same table of steps
and where to look next. Everything a step printed, KFP's executor input included, goes to its own log file,
`<workdir>/reports/pipeline/<time>/<step>.log`, and a failed step shows its last lines.

How (kfp 2.x's local runner has no quiet mode): KFP's own records (`logging.info` on the root logger in
`kfp.local`) are dropped by a filter on the root logger; its "non-Python base image" and "no effect in the
local runner" warnings by warning filters; the function that runs a step's subprocess and prints its output
(`subprocess_task_handler.run_local_subprocess`) and the one that dispatches a step
(`task_dispatcher.run_single_task_implementation`) are wrapped for the duration of the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from versavit import layout, storage
from versavit.config import RunConfig
from versavit.environ import environment as _environment
from versavit.launch.errors import LaunchError
from versavit.tracking import PIPELINE_ENV, RUN_NAME_ENV, tracking_uri
from versavit.tracking.identity import OVERRIDES_ENV, config_changes, experiment_url, overrides_env, ui_base
from versavit.tracking.runs import QUICK_EXIT_ENV

# what a step's output shows on the console (the rest goes to its log file)
_PROGRESS = re.compile(r"^\S+ step \d+/\d+ ")  # versavit.train.loop._Progress's plain lines
_LEVEL = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b")
_LOG_RECORD = re.compile(r"^(\[KFP Executor [^\]]*\]:|\[rank \d+\]|\d{4}/\d\d/\d\d \d\d:\d\d:\d\d)\s*")
_PY_WARNING = re.compile(r"^\S+\.py:\d+: \w*Warning: ")
NO_REASON = "no error line in its log"
_STEP_ERROR = re.compile(r"^(?:[a-z_]\w*\.)*[A-Z]\w*[a-z]\w*: \S")  # the last line of a traceback


@dataclass
class Step:
    """One step of the run as the console reports it."""

    name: str
    log: Path
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    status: str = "running"  # ok | FAILED | retried
    output: str = ""
    reason: str = ""

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started


class _StepReporter:
    """Names, times and logs the steps; prints one line per step and the lines of a step worth seeing."""

    def __init__(self, console: Console, log_dir: Path, workdir: str, tracking_uri: str = ""):
        self.console, self.log_dir, self.workdir, self.tracking_uri = console, log_dir, workdir, tracking_uri
        self.steps: list[Step] = []
        self.current = threading.local()
        self.lock = threading.Lock()

    # -------------------------------------------------------------------- naming
    @staticmethod
    def step_name(component: str, arguments: dict[str, Any]) -> str:
        name = component.removeprefix("comp-")
        base = re.sub(r"-\d+$", "", name)
        if base == "evaluator" and arguments.get("name"):
            return f"evaluate {arguments['name']}"
        if base == "train" and arguments.get("stage"):
            return f"train {arguments['stage']}" + (f"-{arguments['variant']}" if arguments.get("variant") else "")
        if "shard_index" in arguments and "num_shards" in arguments:
            label = f"label-{arguments['kind']}" if base == "label-datasets" else base
            # KFP's local runner passes a ParallelFor's ints as floats (1.0)
            return f"{label} {int(arguments['shard_index']) + 1}/{int(arguments['num_shards'])}"
        return base

    def short(self, text: str) -> str:
        """A step's output for one line: paths relative to the workdir, JSON summarised."""
        text = str(text).strip()
        if text.startswith(("{", "[")):
            with contextlib.suppress(ValueError):
                data = json.loads(text)
                if isinstance(data, dict):
                    parts = []
                    for key, value in data.items():
                        n = value.get("num_samples", value.get("samples")) if isinstance(value, dict) else None
                        parts.append(f"{key} {n}" if n is not None else str(key))
                    text = "; ".join(parts)
        if self.workdir and text.startswith(self.workdir.rstrip("/") + "/"):
            text = text[len(self.workdir.rstrip("/")) + 1:]
        return text if len(text) <= 90 else text[:87] + "..."

    # ------------------------------------------------------------------- steps
    def start(self, component: str, arguments: dict[str, Any]) -> Step:
        name = self.step_name(component, arguments)
        with self.lock:
            n = sum(1 for s in self.steps if s.name == name)
            fname = re.sub(r"[^\w.-]+", "_", name) + (f".{n + 1}" if n else "") + ".log"
            step = Step(name, self.log_dir / fname)
            self.steps.append(step)
        self.current.step = step
        return step

    def end(self, step: Step, ok: bool, outputs: dict[str, Any]) -> None:
        step.ended = time.monotonic()
        step.status = "ok" if ok else "FAILED"
        if ok:
            value = next(iter(outputs.values()), "") if outputs else ""
            step.output = self.short(value) if value not in (None, "") else ""
            if step.name == "open-run" and (name := _run_name(self.tracking_uri, str(value))):
                step.output = f"MLflow run {name} ({value})"
        else:
            step.reason = _failure_reason(step.log)
        self.current.step = None
        self.print_step(step)

    def print_step(self, step: Step) -> None:
        mark = {"ok": "[green]✓[/green]", "FAILED": "[red]✗[/red]"}.get(step.status, "·")
        tail = escape(step.output or step.reason)
        status = "" if step.status == "ok" else f" [red]{step.status}[/red]"
        self.console.print(f"{mark} {escape(step.name):<18}{status} {_duration(step.seconds):>8}  {tail}",
                           highlight=False)
        if step.status == "FAILED":
            for line in _tail(step.log) if step.reason == NO_REASON else ():
                self.console.print(f"    {escape(line)}", highlight=False)
            self.console.print(f"    its log: {step.log}", highlight=False)

    # ------------------------------------------------------------ step output
    def show(self, line: str) -> str | None:
        """The part of a step's output line worth the console, or None."""
        text = line.rstrip()
        bare = _LOG_RECORD.sub("", text)
        if _PROGRESS.match(bare):
            return bare
        if _PY_WARNING.match(bare) or text.lstrip().startswith("warnings.warn("):
            return None
        if _LEVEL.search(text[:80]) and not bare.startswith("Got executor_input"):
            return bare
        if bare.startswith("error:"):
            return bare
        return None

    def run_subprocess(self, full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        """KFP's `run_local_subprocess`, with the output to the step's log file and the console filtered."""
        step: Step | None = getattr(self.current, "step", None)
        env = {**os.environ, **(env_vars or {}), "PYTHONUNBUFFERED": "1", QUICK_EXIT_ENV: "1"}
        log = step.log if step else self.log_dir / "step.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        prefix = f"  {step.name} │ " if step else "  "
        with log.open("a") as out, subprocess.Popen(full_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                    text=True, bufsize=1, env=env) as proc:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, ""):
                out.write(line)
                out.flush()
                if (shown := self.show(line)) is not None:
                    self.console.print(f"[dim]{escape(prefix)}[/dim]{escape(shown)}", highlight=False,
                                       soft_wrap=True)
            return proc.wait()

    # ------------------------------------------------------------- summary
    def table(self, title: str) -> Table:
        table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
        for col, justify in (("step", "left"), ("status", "left"), ("time", "right"), ("output", "left")):
            table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for s in self.steps:
            status = "[green]ok[/green]" if s.status == "ok" else f"[red]{s.status}[/red]"
            table.add_row(escape(s.name), status, _duration(s.seconds), escape(s.output or s.reason))
        return table


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 100 else f"{int(seconds) // 60}:{int(seconds) % 60:02d} min"


def _tail(log: Path, lines: int = 4) -> list[str]:
    """The last lines of a failed step's log, without KFP's own records, the executor input and traceback frames
    (the log has them)."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    keep = [ln for ln in text if ln.strip() and not ln.startswith(("[KFP Executor", "    ", "{", "}", "  File ",
                                                                    "Traceback (most recent call last)"))]
    return keep[-lines:]


def _failure_reason(log: Path) -> str:
    """The last exception line or `error:` line of a step's log."""
    for line in reversed(_tail(log, 200)):
        bare = _LOG_RECORD.sub("", line.strip())
        if bare.startswith("error:") or _STEP_ERROR.match(bare):
            return bare if len(bare) <= 200 else bare[:197] + "..."
    return NO_REASON


@contextlib.contextmanager
def _quiet_kfp(reporter: _StepReporter) -> Iterator[None]:
    """KFP's local runner, made quiet: its records dropped, its warnings ignored, each step's subprocess run
    through `reporter` (see the module docstring)."""
    from kfp.local import logging_utils, subprocess_task_handler, task_dispatcher

    def from_kfp(record: logging.LogRecord) -> bool:
        return f"{os.sep}kfp{os.sep}" not in record.pathname

    original_dispatch = task_dispatcher.run_single_task_implementation

    def dispatch(*args: Any, **kwargs: Any) -> Any:
        component = kwargs.get("component_name", args[1] if len(args) > 1 else "step")
        arguments = kwargs.get("arguments", args[4] if len(args) > 4 else {}) or {}
        step = reporter.start(component, arguments)
        outputs: dict[str, Any] = {}
        ok = False
        try:
            outputs, status = original_dispatch(*args, **kwargs)
            ok = getattr(status, "name", str(status)) == "SUCCESS"
            return outputs, status
        finally:
            reporter.end(step, ok, outputs)

    root = logging.getLogger()
    root.addFilter(from_kfp)
    patches = [(task_dispatcher, "run_single_task_implementation", dispatch),
               (subprocess_task_handler, "run_local_subprocess", reporter.run_subprocess),
               (logging_utils, "print_horizontal_line", lambda: None)]
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in patches]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*non-Python base image", category=RuntimeWarning)
            warnings.filterwarnings("ignore", message=r".*no effect in the current local runner")
            for mod, attr, new in patches:
                setattr(mod, attr, new)
            yield
    finally:
        for mod, attr, old in saved:
            setattr(mod, attr, old)
        root.removeFilter(from_kfp)


def _run_name(uri: str, run_id: str) -> str | None:
    """A run's name, read straight from a local SQLite store (None elsewhere)."""
    if not uri.startswith("sqlite:///") or not re.fullmatch(r"[0-9a-f]{32}", run_id):
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{uri[len('sqlite:///'):]}?mode=ro", uri=True)) as db:
            row = db.execute("select name from runs where run_uuid = ?", (run_id,)).fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _parent_run(uri: str, experiment: str) -> dict[str, str]:
    """The parent run's name and id and the experiment id, read straight from a local SQLite store (no MLflow
    import in this process); {} for other stores."""
    if not uri.startswith("sqlite:///"):
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{uri[len('sqlite:///'):]}?mode=ro", uri=True)) as db:
            exp = db.execute("select experiment_id from experiments where name = ?", (experiment,)).fetchone()
            if exp is None:
                return {}
            row = db.execute("select r.run_uuid, r.name from runs r join tags t on t.run_uuid = r.run_uuid "
                             "where r.experiment_id = ? and t.key = 'versavit.pipeline' and t.value = 'true' "
                             "order by r.start_time desc limit 1", (exp[0],)).fetchone()
    except sqlite3.Error:
        return {}
    return {"experiment_id": str(exp[0]), **({"run_id": row[0], "run_name": row[1]} if row else {})}


def run_local(cfg: RunConfig, pipeline: str = "versavit", console: Console | None = None,
              run_name: str | None = None, base: tuple[str, RunConfig] | None = None) -> dict[str, Any]:
    """Run a KFP pipeline on this machine with KFP's local runner (subprocesses, this Python).

    Training stages become local torchrun launches; MLflow is the config's URI (a SQLite file in the workdir by
    default). `run_name` names the MLflow parent run (default `<config>-<hash>-<time>`); `base` (the config file's
    name and its config without overrides) puts the overrides in the run's description. Prints one line per step,
    then the comparison, the steps again as a table, and where to look next.
    """
    from kfp import local

    from pipelines import PIPELINES

    console = console or Console(stderr=True)
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; expected one of {sorted(PIPELINES)}")
    if storage.is_remote(cfg.workdir):
        raise ValueError("a local pipeline run needs a local workdir (KFP's local runner cannot use s3:// as its "
                         "pipeline root); use `versavit pipeline submit` for s3:// workdirs")
    storage.configure(cfg.storage)
    overrides = overrides_env(base[0], config_changes(base[1], cfg)) if base is not None else None
    workdir = Path(cfg.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"workdir": str(workdir)})  # components run with their own cwd
    log_dir = layout.reports_dir(cfg, "pipeline") / time.strftime("%Y%m%d-%H%M%S")
    reporter = _StepReporter(console, log_dir, str(workdir), tracking_uri(cfg))
    env = {PIPELINE_ENV: pipeline, RUN_NAME_ENV: run_name, OVERRIDES_ENV: overrides}
    console.print(f"pipeline [bold]{pipeline}[/bold] on {workdir} (step logs: {log_dir})", highlight=False)
    started = time.perf_counter()
    failure: Exception | None = None
    with _environment(env), _quiet_kfp(reporter):
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(layout.kfp_local_root(workdir)),
                   raise_on_error=True)
        try:
            PIPELINES[pipeline](cfg)()
        except RuntimeError as exc:  # KFP: "Pipeline ... finished with status FAILURE. Inner task failed: ..."
            failure = exc
    elapsed = time.perf_counter() - started
    report = layout.reports_dir(cfg, "eval") / "comparison.md"
    if failure is None and report.is_file():
        console.print(report.read_text(), markup=False, highlight=False)
    status = "finished" if failure is None else "[red]FAILED[/red]"
    console.print(reporter.table(f"pipeline {pipeline} {status} in {_duration(elapsed)}"), highlight=False)
    _where_next(console, cfg, workdir, report, log_dir)
    if failure is not None:
        failed = next((s for s in reversed(reporter.steps) if s.status == "FAILED"), None)
        where = f"step {failed.name!r} failed: {failed.reason} (its log: {failed.log})" if failed else str(failure)
        raise LaunchError(f"pipeline {pipeline!r}: {where}")
    return {"elapsed_s": elapsed, "report": str(report) if report.is_file() else None,
            "steps": [{"name": s.name, "status": s.status, "seconds": round(s.seconds, 2), "output": s.output,
                       "log": str(s.log)} for s in reporter.steps], "log_dir": str(log_dir)}


def _where_next(console: Console, cfg: RunConfig, workdir: Path, report: Path, log_dir: Path) -> None:
    uri = tracking_uri(cfg)
    found = _parent_run(uri, cfg.tracking.experiment)
    lines = ["[bold]Where to look next[/bold]"]
    if report.is_file():
        lines.append(f"  report      {report}  (figures: {report.parent / 'figures'})")
    run = f"run {found['run_name']} ({found['run_id']}) " if found.get("run_name") else ""
    lines.append(f"  MLflow      {run}in experiment {cfg.tracking.experiment!r} at {uri}")
    if uri.startswith("sqlite:"):
        url = experiment_url(ui_base(uri), found.get("experiment_id"))
        lines.append(f"  UI          versavit ui workdir={workdir}  ->  {url}")
        lines.append(f"              (or: mlflow ui --backend-store-uri {uri})")
    else:
        lines.append(f"  UI          {experiment_url(ui_base(uri), None)}")
    name = found.get("run_name", "<run>")
    lines.append(f"  compare     versavit compare {name} <another run> workdir={workdir}")
    lines.append(f"  step logs   {log_dir}")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
