"""`make screenshots`: the MLflow UI as a user comparing runs sees it, captured by headless Chromium.

    docs/mlflow-runs.png      the experiment's runs table, "Model training" view, saved headline columns
    docs/mlflow-compare.png   MLflow's compare page for the two newest pipeline runs

The runs come from the store in --workdir (default runs/screenshots): if it holds fewer than two pipeline runs,
the shrunk tiny pipeline (tests/pipeline_run.py) runs there until it does, the second time with a longer
multi-task stage (data and labels are reused). The store is served by `mlflow server` on 127.0.0.1 (a free port)
for the captures, then stopped. Needs Chromium (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from pipeline_run import run_shrunk_pipeline  # noqa: E402

from versavit.tracking.identity import compare_url, experiment_url  # noqa: E402

EXPERIMENT = "versavit-tiny"
HOST = "versavit-mlflow"


def _pipeline_runs(db: Path) -> list[tuple[str, str]]:
    """(experiment id, run id) of the pipeline runs in the store, newest first."""
    if not db.is_file():
        return []
    with sqlite3.connect(db) as con:
        return con.execute("select r.experiment_id, r.run_uuid from runs r join tags t on t.run_uuid = r.run_uuid "
                           "join experiments e on e.experiment_id = r.experiment_id where e.name = ? and "
                           "t.key = 'versavit.pipeline' and t.value = 'true' and r.status = 'FINISHED' "
                           "order by r.start_time desc", (EXPERIMENT,)).fetchall()


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("error: no Chromium found (Debian: apt-get install chromium)")


def _shoot(browser: str, url: str, out: Path, size: str) -> None:
    # HOST names 127.0.0.1 for Chromium alone: MLflow 3.x opens its assistant panel on a page served from
    # localhost / 127.0.0.1, which would cover a third of the picture
    cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--host-resolver-rules=MAP {HOST} 127.0.0.1", f"--window-size={size}", "--virtual-time-budget=30000",
           f"--screenshot={out}", url]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB) from {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "screenshots")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    workdir, db = args.workdir.resolve(), args.workdir.resolve() / "mlflow.db"
    browser = _chromium()
    # the second run: a longer multi-task stage (train.restart: its checkpoints were made under the first config)
    for extra in ([], ["train.multitask.max_steps=12", "train.restart=true"])[len(_pipeline_runs(db)):]:
        print(f"running the shrunk tiny pipeline in {workdir} {' '.join(extra)} ...", flush=True)
        run = run_shrunk_pipeline(workdir, *extra)
        if run.returncode:
            sys.exit(f"error: the pipeline failed:\n{run.stderr[-3000:]}")
    (exp_id, newest), (_, older) = _pipeline_runs(db)[:2]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--allowed-hosts", f"{HOST}:{port},127.0.0.1:{port},localhost:{port}",
                               "--cors-allowed-origins", f"http://{HOST}:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                sys.exit("error: mlflow server exited")
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                sys.exit("error: mlflow server did not answer in 300 s")
            time.sleep(0.5)
        args.out.mkdir(parents=True, exist_ok=True)
        _shoot(browser, experiment_url(base, str(exp_id)), args.out / "mlflow-runs.png", "2400,520")
        _shoot(browser, compare_url(base, [older, newest], [str(exp_id)]), args.out / "mlflow-compare.png",
               "1600,1500")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
