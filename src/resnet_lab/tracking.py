"""MLflow plumbing: where the store is, what to tag, and the one place where runs begin and end.

    python -m resnet_lab.tracking sync models/resnet34-0

A training run's directory is its durable record; `sync` brings its MLflow run up to date from it after
every epoch and at the end. While the tracking server is away, training goes on; what it held back is
sent by the next sync that gets through, or by the command above once the server is back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from resnet_lab.errors import ConfigError, cli
from resnet_lab.files import write_text_atomically

log = logging.getLogger(__name__)


def _git(*args: str) -> str | None:
    """What `git ARGS` prints in the working directory; None outside a repository or without git."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def tracking_uri(cfg: DictConfig) -> str:
    """`$MLFLOW_TRACKING_URI`, else `tracking.uri`, else SQLite at the repository root (absolute).

    DVC's temporary experiment copies (`dvc exp run --temp`, queued experiments) in `<repo>/.dvc/tmp/exps/`
    log to the store of `<repo>`, not of the copy, which DVC deletes.
    """
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    if cfg.tracking.get("uri"):
        return str(cfg.tracking.uri)
    cwd = str(Path.cwd().resolve())
    repo, in_copy, _ = (cwd + os.sep).partition(os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep)
    root = repo if in_copy else _git("rev-parse", "--show-toplevel") or cwd
    return f"sqlite:///{Path(root) / 'mlflow.db'}"


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str):
    """Point MLflow's fluent API at `uri` for a while, then put back exactly what was there.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI, which would outlive the call and send
    later runs of this process (the next job of a sweep) to this store whatever their configuration says.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = tracking_utils._tracking_uri  # None unless someone called set_tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created if need be.

    With a SQLite store its artifacts go to `mlruns/` beside the database, by absolute path, so runs
    from any working directory (DVC's temporary copies, pytest's) keep their artifacts together.
    """
    if experiment := client.get_experiment_by_name(name):
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    sqlite = uri.startswith("sqlite:///")
    location = (Path(uri[len("sqlite:///") :]).resolve().parent / "mlruns").as_uri() if sqlite else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # else a parallel job created it first
            raise
    return client.get_experiment_by_name(name).experiment_id


PARENT_RUN_ENV = "RESNET_LAB_PARENT_RUN_ID"
RUN_ID_FILE = "mlflow_run.json"
STATUS_FILE = "status.json"
HISTORY_FILE = "history.csv"
# What a finished training run's directory sends as artifacts (the model goes as a logged model).
RUN_ARTIFACTS = ("config.yaml", "model_summary.txt", HISTORY_FILE, "learning_curve.png", "summary.json")
KIND_TAG = "resnet_lab.kind"
HOST_TAG = "resnet_lab.host"
PID_TAG = "resnet_lab.pid"
FAILURE_TAG = "resnet_lab.failure"
OUTAGE_TAG = "resnet_lab.tracking_outage"
# MLflow retries a refused connection for about four minutes (7 retries, backoff factor 2): each epoch
# and the run's end would stall for as long as the server is away. Two quick retries ride out a restart;
# what they could not send stays in the run directory for a later sync. The environment's values win.
_QUICK_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def _masked(cfg: DictConfig):
    """The resolved configuration as plain containers, with any password in a URI masked."""

    def mask(node):
        if isinstance(node, dict):
            return {key: mask(value) for key, value in node.items()}
        if isinstance(node, list):
            return [mask(value) for value in node]
        return mask_password(node) if isinstance(node, str) else node

    return mask(OmegaConf.to_container(cfg, resolve=True))


def masked_yaml(cfg: DictConfig) -> str:
    """The resolved configuration as YAML with any password in a URI masked: the `config.yaml` a run logs."""
    return OmegaConf.to_yaml(_masked(cfg))


# A URI's password as `urlsplit` reads it: after the user's first colon, up to the last `@` before the
# path; the optional backslash finds it in Hydra's escaped overrides too (`http\://user\:secret@host`).
_PASSWORD_IN_URI = re.compile(r"(://[^/?#:]*\\?:)[^/?#]+@")


def mask_password(value: str) -> str:
    """`scheme://user:secret@host` -> `scheme://user:***@host`; anything else unchanged."""
    return _PASSWORD_IN_URI.sub(r"\1***@", value)


def _health_failure(uri: str, timeout_s: float) -> str | None:
    """Why an HTTP tracking server does not answer its health check (None when it does, or not HTTP)."""
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as exc:
        return type(exc).__name__
    return None


def check_reachable(uri: str) -> None:
    """Fail before training, with the URI in the message, when the tracking store cannot be reached.

    Raises:
        ConfigError: an HTTP server fails its health check, or a SQLite file's directory does not exist.
    """
    if failure := _health_failure(uri, timeout_s=5.0):
        raise ConfigError(f"cannot reach the MLflow tracking server at {mask_password(uri)}: {failure}")
    folder = Path(uri[len("sqlite:///") :]).parent
    if uri.startswith("sqlite:///") and not folder.is_dir():
        raise ConfigError(
            f"MLflow tracking URI {mask_password(uri)}: directory {str(folder)!r} does not exist"
        )


def context_tags() -> dict[str, str]:
    """Where a run came from: git commit, DVC experiment, Hydra sweep and job, parent sweep run."""
    tags: dict[str, str] = {}
    if commit := _git("rev-parse", "HEAD"):
        tags["mlflow.source.git.commit"] = commit
    if exp_name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = exp_name
    if HydraConfig.initialized() and (hydra_cfg := HydraConfig.get()).mode.name == "MULTIRUN":
        tags["hydra.sweep_dir"] = str(Path(hydra_cfg.sweep.dir).resolve())
        tags["hydra.job_num"] = str(hydra_cfg.job.num)
        tags["hydra.overrides"] = ",".join(map(mask_password, hydra_cfg.overrides.task))
    if parent := os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = parent
    return tags


def user_tags(cfg: DictConfig) -> dict[str, str]:
    """The configuration's free-form `tags`: `name` -> {name: "true"}, `key=value` -> {key: value}."""
    pairs = (str(tag).split("=", 1) for tag in cfg.get("tags") or [])
    return {pair[0]: pair[1] if len(pair) == 2 else "true" for pair in pairs}


class Run:
    """An open MLflow run, as the stages log to it through `MlflowClient` by explicit run id."""

    def __init__(self, client, run_id: str, *, resumed: bool = False):
        self.client = client
        self.run_id = run_id
        self.resumed = resumed

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        # MlflowClient.log_batch splits a long list into batches the store accepts.
        items = [Param(key, mask_password(str(value))[:6000]) for key, value in params.items()]
        self.client.log_batch(self.run_id, params=items)

    def log_metrics(self, metrics: dict[str, float], step: int = 0, *, model_id=None, dataset=None) -> None:
        """Log at `step`; with `model_id` and `dataset` (an `mlflow.entities.Dataset`), linked to both."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        link = {"model_id": model_id}
        if dataset is not None:
            link.update(dataset_name=dataset.name, dataset_digest=dataset.digest)
        items = [Metric(key, float(value), now, step, **link) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)


@contextlib.contextmanager
def open_run(
    cfg: DictConfig,
    kind: str,
    name: str,
    *,
    tags: dict[str, str] | None = None,
    record_dir: str | os.PathLike | None = None,
    params: bool = False,
    system_metrics: bool = False,
):
    """The one place where this project's MLflow runs begin and end: `with open_run(...) as run:`.

    The run is tagged `resnet_lab.kind`, the host and process, the git commit and any Hydra sweep. It ends
    FINISHED when the block completes, KILLED on Ctrl-C or SIGTERM (which the entry points raise as
    KeyboardInterrupt), FAILED with the reason in the `resnet_lab.failure` tag on any other exception:
    never left RUNNING. Runs of its kind that a kill -9 on this machine left RUNNING end KILLED as it opens.

    Args:
        cfg: the configuration (`tracking`).
        kind: `train`, `evaluate`, `study`, `bench` or `sweep`.
        name: the run name shown in the UI.
        tags: more tags.
        record_dir: a training run's directory, its durable record (see `sync`): it keeps the run id, which a
            restarted run continues, and gets the end first; a tracking server away at the end leaves the
            run RUNNING until `python -m resnet_lab.tracking sync DIR`.
        params: log `cfg`'s resolved values as parameters (a new run only).
        system_metrics: sample MLflow's system metrics every `tracking.system_metrics_interval_s`
            (a resumed run continues their steps).

    Yields:
        The `Run` (`resumed` when it continues the one recorded in `record_dir`); None with `tracking=off`.
    """
    record_dir = Path(record_dir) if record_dir is not None else None
    # Every request of a training run retries briefly (_QUICK_RETRIES), the system-metrics thread's too.
    with _quick_retries() if record_dir is not None else contextlib.nullcontext():
        if not cfg.tracking.get("enabled", True):
            yield None  # tracking=off
            return
        run = _start_run(cfg, kind, name, tags or {}, record_dir)
        if params and not run.resumed:
            import pandas as pd

            (flat,) = pd.json_normalize(_masked(cfg)).to_dict("records")  # dotted keys
            run.log_params(flat)
        monitor = None
        if system_metrics and (interval := cfg.tracking.get("system_metrics_interval_s")):
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                run.run_id, sampling_interval=interval, resume_logging=run.resumed,
                tracking_uri=run.client.tracking_uri,
            )  # fmt: skip
            monitor.start()
        end = {"status": "FINISHED", "end_time": None}  # and `failure`, in this order in status.json
        try:
            yield run
        except KeyboardInterrupt:
            end["status"] = "KILLED"
            raise
        except BaseException as exc:
            end.update(status="FAILED", failure=" ".join(f"{type(exc).__name__}: {exc}".split())[:4000])
            raise
        finally:
            if monitor is not None:
                monitor.finish()
            end["end_time"] = int(time.time() * 1000)
            with _signals_held():
                if record_dir is None:
                    _end(run.client, run.run_id, end)
                else:
                    _end_recorded(run, end, record_dir)


def _start_run(cfg: DictConfig, kind: str, name: str, tags: dict[str, str], record_dir: Path | None) -> Run:
    """A new run, or the one `record_dir` records (a restarted training run) set RUNNING again."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = experiment_id(client, str(cfg.tracking.experiment_name), uri)
    _end_orphaned_runs(client, experiment, kind)
    if record_dir is not None and (record_dir / RUN_ID_FILE).is_file():
        run_id = json.loads((record_dir / RUN_ID_FILE).read_text())["run_id"]
        try:
            client.get_run(run_id)
        except MlflowException:
            pass  # not in this store: a new run
        else:
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "resnet_lab.resumed", "true")
            client.set_tag(run_id, PID_TAG, str(os.getpid()))
            (record_dir / STATUS_FILE).unlink(missing_ok=True)
            return Run(client, run_id, resumed=True)
    process = {KIND_TAG: kind, HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    tags = {**context_tags(), **process, **user_tags(cfg), **tags}
    run = Run(client, client.create_run(experiment, run_name=name, tags=tags).info.run_id)
    if record_dir is not None:
        record_dir.mkdir(parents=True, exist_ok=True)
        (record_dir / STATUS_FILE).unlink(missing_ok=True)
        log_model = bool(cfg.tracking.get("log_model", False))
        recorded = {"run_id": run.run_id, "tracking_uri": mask_password(uri), "log_model": log_model}
        write_text_atomically(record_dir / RUN_ID_FILE, json.dumps(recorded) + "\n")
    return run


def _end_recorded(run: Run, end: dict, record_dir: Path) -> None:
    """End a training run: in its directory first, then in MLflow by a sync, or by a later one."""
    write_text_atomically(record_dir / STATUS_FILE, json.dumps(end) + "\n")
    try:
        sync(record_dir, run.client, live=True)
    except Exception as exc:
        if not _unreachable(exc):
            raise
        log.warning(
            "MLflow run %s stays RUNNING at %s until `python -m resnet_lab.tracking sync %s` "
            "sends what it lacks and its end (%s)",
            run.run_id, mask_password(run.client.tracking_uri), record_dir, end["status"],
        )  # fmt: skip


def log_dataset_inputs(run: Run, cfg: DictConfig, splits: Sequence[str]) -> dict:
    """Log the prepared splits the run saw as MLflow dataset inputs, so the UI's Datasets column shows them.

    Each digest hashes `dataset.json`'s TFDS file checksums and the split's index file (none for a whole
    TFDS split), so runs on different data cannot share one.

    Returns:
        split -> the `mlflow.entities.Dataset` logged.
    """
    import hashlib

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from resnet_lab.data import dataset_info

    info = dataset_info(cfg)
    files = json.dumps(info["tfds_files"], sort_keys=True)
    tfds = f"{info['name']}:{info['version']}"
    schema = json.dumps({"image_shape": info["image_shape"], "classes": info["class_names"]})
    inputs = []
    for split in splits:
        entry = info["splits"][split]
        source = {"tfds": tfds, "split": entry["source"], "indices": entry["indices"]}
        profile = {"num_examples": entry["num_examples"], "class_counts": entry.get("class_counts")}
        dataset = Dataset(
            name=f"{info['name']}-{split}",
            digest=hashlib.sha256((files + str(entry["indices_sha256"])).encode()).hexdigest()[:16],
            source_type="tfds",
            source=json.dumps(source),
            schema=schema,
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, split)]))
    for attempt in range(3):
        try:
            run.client.log_inputs(run.run_id, datasets=inputs)
            break
        except MlflowException as exc:
            # MLflow's SQL store looks a dataset up, then inserts it: two sweep runs logging the same new one
            # at once both miss it and the later insert fails (IntegrityError); a retry finds the other's row.
            if attempt == 2 or "IntegrityError" not in exc.message:
                raise
            log.info("MLflow run %s: another run logged the same dataset at once; logging again", run.run_id)
    return {split: i.dataset for split, i in zip(splits, inputs, strict=True)}


def register_champion(run: Run, cfg: DictConfig, members: Sequence[dict], answer: str) -> str | None:
    """Register the study's best residual net in the model registry and point the alias `champion` at it.

    The one with the lowest test error becomes a version of `resnet-lab-<dataset>`, tagged with the study
    run, the verdict and the git commit; a rerun of the same study finds that version instead of adding one.

    Args:
        run: the study run.
        cfg: the configuration (`data.name`).
        members: what `compare.load_members` returns (`summary` with `family` and `mlflow_run_id`,
            `evaluation` with `test_error`).
        answer: the study's verdict.

    Returns:
        The version registered or found; None (with a warning) when the training run logged no model.
    """
    from mlflow.exceptions import MlflowException

    residual = [m for m in members if m["summary"].get("family") == "residual"]
    if not residual:
        return None
    best = min(residual, key=lambda m: m["evaluation"]["test_error"])
    source_run = best["summary"].get("mlflow_run_id")
    client = run.client
    experiment = client.get_run(run.run_id).info.experiment_id  # the study's: its members' too
    model_id = logged_model_id(client, source_run, experiment) if source_run else None
    if model_id is None:
        log.warning("%s logged no model (tracking.log_model): no champion registered", best["member"])
        return None
    name = f"resnet-lab-{cfg.data.name}"
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    if versions := client.search_model_versions(f"name = '{name}' and run_id = '{source_run}'"):
        version = versions[0]
    else:
        # The registry resolves `models:/<id>` through the fluent API's store: point it at this one.
        with _fluent_tracking_uri(client.tracking_uri):
            version = client.create_model_version(
                name, f"models:/{model_id}", run_id=source_run, model_id=model_id
            )
    tags = {"study_run": run.run_id, "verdict": answer, "member": best["member"]}
    if commit := _git("rev-parse", "HEAD"):
        tags["git_commit"] = commit
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    client.set_registered_model_alias(name, "champion", version.version)
    return str(version.version)


def _end(client, run_id: str, end: dict) -> None:
    if end.get("failure"):
        client.set_tag(run_id, FAILURE_TAG, end["failure"])
    client.set_terminated(run_id, end["status"], end_time=end.get("end_time"))


def _end_orphaned_runs(client, experiment: str, kind: str) -> None:
    """End KILLED the runs of `kind` that a kill -9 on this machine left RUNNING: their process is gone.

    Runs of a live process (a parallel sweep job, another `dvc queue` worker) are left alone.
    """
    import psutil

    host = socket.gethostname()
    running = client.search_runs(
        [experiment], f"tags.`{KIND_TAG}` = '{kind}' and attributes.status = 'RUNNING'", max_results=1000
    )
    for run in running:
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) == host and pid.isdigit() and not psutil.pid_exists(int(pid)):
            client.set_terminated(run.info.run_id, status="KILLED")


def sync(record_dir: str | os.PathLike, client, *, live: bool = False) -> int:
    """Bring a training run in MLflow up to date with its run directory; idempotent.

    The directory holds `history.csv` (written atomically every epoch), and at the end the artifacts,
    `model.keras` and `status.json`. Epochs the run lacks are logged at their step; once the run has ended,
    the artifacts, the model (once) and the end follow. Anything sent late tags the run with the outage.

    Args:
        record_dir: a training run's directory (it holds `mlflow_run.json`).
        client: an `MlflowClient` for the run's tracking store.
        live: called by the run itself, after an epoch or as it ends: its newest epoch and its end are on
            time, and only what an outage held back counts as late.

    Returns:
        The number of epochs sent.
    """
    import math

    import pandas as pd

    record_dir = Path(record_dir)
    recorded = json.loads((record_dir / RUN_ID_FILE).read_text())
    run = Run(client, recorded["run_id"])
    history = record_dir / HISTORY_FILE
    sent: list[int] = []
    with _quick_retries():
        if history.is_file():
            have = {m.step for m in client.get_metric_history(run.run_id, "loss")}
            for row in pd.read_csv(history).to_dict("records"):
                epoch = int(row.pop("epoch"))
                if epoch not in have:
                    run.log_metrics({k: v for k, v in row.items() if math.isfinite(v)}, step=epoch)
                    sent.append(epoch)
        late = sent[:-1] if live else sent
        if late:
            run.set_tags({OUTAGE_TAG: f"epochs {late[0]}-{late[-1]} logged late"})
        status = record_dir / STATUS_FILE
        if not status.is_file():
            return len(sent)
        end = json.loads(status.read_text())
        if end["status"] == "FINISHED":
            summary = record_dir / "summary.json"
            if summary.is_file():
                run.log_metrics({"train_time_s": json.loads(summary.read_text())["train_time_s"]})
            for name in RUN_ARTIFACTS:
                if (record_dir / name).is_file():
                    run.log_artifact(record_dir / name)
            if recorded.get("log_model") and (record_dir / "model.keras").is_file():
                _log_model_once(client, run.run_id, record_dir / "model.keras")
        if client.get_run(run.run_id).info.status != end["status"]:
            if not live and not late:
                run.set_tags({OUTAGE_TAG: "the run's end logged late"})
            _end(client, run.run_id, end)
    return len(sent)


def live_sync(record_dir: Path, client):
    """What a training run calls after each epoch: `sync`, riding out a tracking server that is away.

    While it is away: one warning, then a cheap health probe per epoch until it answers and sync resumes.
    """
    away = False

    def on_epoch() -> None:
        nonlocal away
        if away and _health_failure(client.tracking_uri, 2.0):
            return
        try:
            with _signals_held():
                sync(record_dir, client, live=True)
        except Exception as exc:
            if not _unreachable(exc):
                raise
            if not away:
                log.warning(
                    "MLflow tracking at %s is unreachable (%s); training goes on, and its run directory %s "
                    "is sent when the server answers again, or by `python -m resnet_lab.tracking sync %s`",
                    mask_password(client.tracking_uri), " ".join(str(exc).split())[:200], record_dir,
                    record_dir,
                )  # fmt: skip
            away = True
            return
        away = False

    return on_epoch


def logged_model_id(client, run_id: str, experiment: str | None = None) -> str | None:
    """The id of the model that run `run_id` logged (MLflow 3's logged models); None when it logged none.

    Args:
        experiment: where to look; the run's own when None.
    """
    experiment = experiment or client.get_run(run_id).info.experiment_id
    logged = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    return logged[0].model_id if logged else None


def _log_model_once(client, run_id: str, path: Path) -> None:
    """Log `model.keras` with MLflow's Keras flavour, unless the run already has its logged model."""
    if logged_model_id(client, run_id) is not None:
        return
    import keras
    import mlflow
    import numpy as np
    import tensorflow as tf
    from mlflow.models import infer_signature

    import resnet_lab.models  # noqa: F401  registers the custom layers a saved model refers to

    model = keras.saving.load_model(path, compile=False)
    example = np.zeros((1, *model.input_shape[1:]), dtype="float32")
    # A signature rather than `input_example=`: the Keras flavour writes the example before it
    # creates the model directory, and fails. A direct call, not predict(): one example cannot be
    # split across a strategy's replicas.
    signature = infer_signature(example, keras.ops.convert_to_numpy(model(example, training=False)))
    with (
        _fluent_tracking_uri(client.tracking_uri),
        mlflow.start_run(run_id=run_id, nested=bool(mlflow.active_run())),
    ):
        mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            # Pinned here: inferring them loads the model in a subprocess, which costs a minute.
            pip_requirements=[
                f"tensorflow=={tf.__version__}",
                f"keras=={keras.__version__}",
                f"resnet-lab=={resnet_lab.__version__}",
            ],
        )


class SweepParentRun(Callback):
    """A Hydra callback that opens one MLflow parent run per multirun sweep.

    Every job's run carries it as `mlflow.parentRunId` (through the environment, which the joblib
    launcher's worker processes inherit), so the MLflow UI groups a sweep's runs under one row.
    """

    def __init__(self) -> None:
        self._parent = contextlib.ExitStack()  # holds the parent run open until the sweep ends
        self._run: Run | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        import atexit

        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        self._run = self._parent.enter_context(
            open_run(config, "sweep", f"sweep {Path(sweep_dir).name}", tags={"hydra.sweep_dir": sweep_dir})
        )
        if self._run is not None:
            os.environ[PARENT_RUN_ENV] = self._run.run_id
        # A sweep that dies skips on_multirun_end; the parent must not stay RUNNING.
        atexit.register(self._end, RuntimeError("the sweep ended before its last job"))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self._run is not None:
            summarize_sweep(self._run)
        self._end(None)

    def _end(self, error: BaseException | None) -> None:
        """End the parent run, once: FAILED with `error`."""
        os.environ.pop(PARENT_RUN_ENV, None)
        self._parent.__exit__(type(error) if error else None, error, None)

    def __reduce__(self):
        # The joblib launcher pickles the callbacks for its workers: they get a fresh one, not the open run.
        return (SweepParentRun, ())


SWEEP_METRIC = "val_error"


def summarize_sweep(parent: Run) -> None:
    """End a sweep's parent run with the answer to "which won": the best job's metrics and a table of all.

    The parent gets each child's `val_error` as `val_error/job<n>-<run name>`, the best child's final
    metrics under `best/`, its run id and name as tags, and `sweep_summary.csv` with one row per child.
    """
    import pandas as pd

    experiment = parent.client.get_run(parent.run_id).info.experiment_id
    children = parent.client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent.run_id}'", max_results=10000
    )
    rows = [
        {
            "job": f"job{c.data.tags.get('hydra.job_num', '')}-{c.info.run_name}",
            "run_name": c.info.run_name,
            "run_id": c.info.run_id,
            "status": c.info.status,
            **c.data.metrics,
        }  # fmt: skip
        for c in children
    ]
    if not rows:
        return
    table = pd.DataFrame(rows)
    table = table.sort_values(SWEEP_METRIC if SWEEP_METRIC in table else "run_name")
    parent.log_text(table.to_csv(index=False), "sweep_summary.csv")
    scored = table.dropna(subset=[SWEEP_METRIC]) if SWEEP_METRIC in table else table.iloc[:0]
    parent.log_metrics({f"{SWEEP_METRIC}/{row.job}": row[SWEEP_METRIC] for _, row in scored.iterrows()})
    if len(scored):
        best = scored.iloc[0]
        metrics = best.drop(["job", "run_name", "run_id", "status"]).dropna()
        parent.log_metrics({f"best/{k}": v for k, v in metrics.items()})
        parent.set_tags({"resnet_lab.best_run_id": best.run_id, "resnet_lab.best_run_name": best.run_name})


@contextlib.contextmanager
def _signals_held():
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them.

    Raised inside an MLflow call, the interrupt can leave the store in the middle of a transaction (SQLite
    stays locked), and the run's end, KILLED, then cannot be written: the run would stay RUNNING.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    # A handler installed outside Python (getsignal() is None) cannot be put back: left alone.
    previous = {n: h for n in (signal.SIGINT, signal.SIGTERM) if (h := signal.getsignal(n)) is not None}
    for signum in previous:
        signal.signal(signum, lambda number, frame: held.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])


@contextlib.contextmanager
def _quick_retries():
    added = {key: value for key, value in _QUICK_RETRIES.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _unreachable(exc: BaseException) -> bool:
    """Whether `exc` means the tracking store is away (try later), not that the request was wrong."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError)):
        return True
    # MLflow reports a refused connection, a timeout and a 5xx after its retries as these.
    away = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE")
    return isinstance(exc, MlflowException) and exc.error_code in away


@cli
def main(argv: Sequence[str] | None = None) -> None:
    """`python -m resnet_lab.tracking sync DIR [--uri URI]`: bring a run in MLflow up to date with DIR.

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` when None.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m resnet_lab.tracking", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("sync", help="send what a run's MLflow run lacks from its directory")
    command.add_argument("dir", type=Path, help="a training run's directory, e.g. models/resnet34-0")
    command.add_argument(
        "--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, else the one recorded in DIR)"
    )
    args = parser.parse_args(argv)
    id_file = args.dir / RUN_ID_FILE
    if not id_file.is_file():
        raise ConfigError(f"{id_file} not found: {args.dir} is not a training run's directory")
    uri = args.uri or os.environ.get("MLFLOW_TRACKING_URI") or json.loads(id_file.read_text())["tracking_uri"]
    if ":***@" in uri:
        raise ConfigError(f"{id_file} records {uri} without its password: pass --uri")
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    count = sync(args.dir, MlflowClient(tracking_uri=uri))
    print(f"{args.dir}: sent {count} epochs to {mask_password(uri)}")


if __name__ == "__main__":
    main()
