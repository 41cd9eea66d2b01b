"""Screenshots of the MLflow UI for the README: a Hydra sweep's runs, and the training error of a study.

Starts `mlflow ui` on the store and drives the system Chromium with Playwright (no `playwright install`):
`runs.png` is the runs table of the newest sweep, its parent run expanded to show its jobs; `error.png` the
chart of metric `error` per epoch, grouped by model (mean line, min-max band), of the newest finished study
run's members (or the sweep's jobs). Runs are found by their tags, never by name. With the `ui` extra:

    python .ci/screenshots.py --store sqlite:///mlflow.db [--experiment resnet-lab] [--out .ci/screenshots]
"""

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

VIEWPORT = {"width": 1600, "height": 900}
CHILDREN_OF = "tags.`mlflow.parentRunId` = '{}'"


def find_runs(store: str, experiment: str):
    """The experiment's id, its newest sweep's parent run and jobs, and the runs to chart."""
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        sys.exit(f"error: no MLflow store at {store!r}")
    client = MlflowClient(tracking_uri=store)
    if (found := client.get_experiment_by_name(experiment)) is None:
        sys.exit(f"error: no experiment {experiment!r} in {store}")
    ids, newest = [found.experiment_id], ["attributes.start_time DESC"]
    for sweep in client.search_runs(ids, "tags.`resnet_lab.kind` = 'sweep'", order_by=newest):
        if jobs := client.search_runs(ids, CHILDREN_OF.format(sweep.info.run_id)):
            break
    else:
        sys.exit(f"error: no Hydra sweep with jobs (a run tagged resnet_lab.kind=sweep) in {experiment!r}")
    studies = "tags.`resnet_lab.kind` = 'study' and attributes.status = 'FINISHED'"
    members = []
    for study in client.search_runs(ids, studies, order_by=newest, max_results=1):
        members = [run_id for key, run_id in study.data.tags.items() if key.startswith("resnet_lab.member.")]
    return found.experiment_id, sweep, jobs, [client.get_run(run_id) for run_id in members] or jobs


@contextlib.contextmanager
def mlflow_ui(store: str):
    """`mlflow ui` on a free port of 127.0.0.1, its log on stderr: its URL once `/health` answers."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--workers", "1"]
    command += ["--host", "127.0.0.1", "--port", port, "--uvicorn-opts=--no-access-log --log-level warning"]
    # No job runner (GenAI jobs): its consumers outlive SIGTERM. Its own process group, to stop uvicorn too.
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300  # a minute on a busy machine
        while time.monotonic() < deadline and server.poll() is None:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=5):
                break
            time.sleep(1)
        else:
            sys.exit(f"error: `mlflow ui` did not answer on {url} (its log is above)")
        yield url
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL: what is left 20 s after SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=20)


def open_runs(page, url: str, experiment_id: str, search: str, mode: str) -> None:
    # workflowType: without it MLflow 3 opens the GenAI overview instead of the runs.
    query = {"workflowType": "machine_learning", "searchFilter": search, "compareRunsMode": mode}
    page.goto(f"{url}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(query)}")


def shoot_sweep(page, url: str, experiment_id: str, sweep, jobs: list, path: Path) -> None:
    # The filter finds the jobs; the UI adds their parent run, collapsed.
    open_runs(page, url, experiment_id, CHILDREN_OF.format(sweep.info.run_id), "TABLE")
    page.locator(f".ag-row[row-id='{sweep.info.run_id}'] [col-id='attributes.`Run Name`'] button").click()
    page.get_by_text(jobs[-1].info.run_name, exact=True).first.wait_for()
    page.get_by_test_id("column-selection-dropdown").first.click()
    for metric in ("error", "val_error"):
        page.get_by_placeholder("Search columns").fill(metric)
        page.locator(".du-bois-light-tree-title").filter(has_text=re.compile(f"^{metric}$")).click()
    page.keyboard.press("Escape")
    page.evaluate("document.activeElement.blur()")  # no focus ring on the Columns button
    page.locator(".ag-header-cell[col-id='metrics.`val_error`']").wait_for()
    last_row = page.locator(".ag-center-cols-container .ag-row").last.bounding_box()
    page.screenshot(path=path, clip=VIEWPORT | {"x": 0, "y": 0, "height": last_row["y"] + 80})


def shoot_error_chart(page, url: str, experiment_id: str, runs: list, path: Path) -> None:
    search = "attributes.run_id IN (" + ", ".join(f"'{run.info.run_id}'" for run in runs) + ")"
    open_runs(page, url, experiment_id, search, "CHART")
    page.get_by_placeholder("Search metric charts").fill("^error$")
    page.get_by_role("button", name="Group by").click()
    page.get_by_role("menu").get_by_text("resnet_lab.model", exact=True).click()
    page.keyboard.press("Escape")
    page.get_by_text(f"{runs[0].data.tags['resnet_lab.model']} (error)", exact=True).wait_for()
    # The chart starts a third of the page wide: drag its corner to the right edge.
    handle = page.get_by_test_id("draggable-card-resize-handle")
    to = {"x": VIEWPORT["width"] - 40, "y": handle.bounding_box()["y"] + 150}
    handle.drag_to(page.locator("body"), target_position=to)
    plot_width = "half => document.querySelector('.js-plotly-plot').getBoundingClientRect().width > half"
    page.wait_for_function(plot_width, arg=VIEWPORT["width"] / 2)
    page.screenshot(path=path, clip=VIEWPORT | {"x": 0, "y": 0, "height": handle.bounding_box()["y"] + 40})


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring and `--help`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, help="MLflow tracking URI, e.g. sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="resnet-lab", help="MLflow experiment name")
    parser.add_argument("--out", type=Path, default=Path(".ci/screenshots"), help="directory for the PNGs")
    args = parser.parse_args(argv)
    if not os.access(chromium := os.environ.get("CHROMIUM", "/usr/bin/chromium"), os.X_OK):
        sys.exit(f"error: no Chromium at {chromium!r}; set CHROMIUM to its executable")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("error: Playwright is missing: pip install -e '.[ui]'")
    experiment_id, sweep, jobs, charted = find_runs(args.store, args.experiment)
    args.out.mkdir(parents=True, exist_ok=True)
    with mlflow_ui(args.store) as url, sync_playwright() as playwright:
        page = playwright.chromium.launch(executable_path=chromium).new_page(viewport=VIEWPORT)
        # MLflow opens its assistant panel on a browser's first visit, over a third of the page.
        page.add_init_script("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")
        shoot_sweep(page, url, experiment_id, sweep, jobs, args.out / "runs.png")
        shoot_error_chart(page, url, experiment_id, charted, args.out / "error.png")
    print(f"wrote {args.out / 'runs.png'} and {args.out / 'error.png'}")


if __name__ == "__main__":
    main()
