"""MLflow plumbing shared by training, evaluation and the report: where the store is, and what to tag."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

from omegaconf import DictConfig

_DVC_TEMP_WORKSPACE = os.path.join(".dvc", "tmp", "exps")


def repo_root(start: Path | None = None) -> Path:
    """The repository root, seen through DVC's temporary experiment copies.

    `dvc exp run --temp` and queued experiments run in `<repo>/.dvc/tmp/exps/<...>`; their runs must land
    in the store of `<repo>`, not of the copy, which DVC deletes.
    """
    path = (start or Path.cwd()).resolve()
    text = str(path)
    marker = os.sep + _DVC_TEMP_WORKSPACE + os.sep
    if marker in text + os.sep:
        return Path((text + os.sep).split(marker, 1)[0])
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True, check=True
        ).stdout.strip()
        return Path(top)
    except (OSError, subprocess.CalledProcessError):
        return path


def tracking_uri(cfg: DictConfig) -> str:
    """`$MLFLOW_TRACKING_URI`, else `tracking.uri`, else SQLite at the repository root (absolute)."""
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    if cfg.tracking.get("uri"):
        return str(cfg.tracking.uri)
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


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
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).resolve().parent / "mlruns").as_uri()
    return client.create_experiment(name, artifact_location=location)


PARENT_RUN_ENV = "RESNET_LAB_PARENT_RUN_ID"
RUN_ID_FILE = "mlflow_run.json"


def flatten(cfg: DictConfig) -> dict[str, str]:
    """The resolved configuration as dotted keys, with any password in a URI masked."""
    from omegaconf import OmegaConf

    flat: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = mask_password(str(node))

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def mask_password(value: str) -> str:
    """`scheme://user:secret@host` -> `scheme://user:***@host`; anything else unchanged."""
    from urllib.parse import urlsplit, urlunsplit

    if "://" not in value:
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if not parts.password:
        return value
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before training, with the URI in the message, when the tracking store cannot be reached.

    Raises:
        ConfigError: an HTTP server that does not answer its health check, or a SQLite file in a
            directory that does not exist.
    """
    from resnet_lab.errors import ConfigError

    shown = mask_password(uri)
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
        except requests.RequestException as exc:
            raise ConfigError(f"cannot reach the MLflow tracking server at {shown}: {type(exc).__name__}") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir():
            raise ConfigError(f"MLflow tracking URI {shown}: directory {str(folder)!r} does not exist")


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def context_tags() -> dict[str, str]:
    """Where a run came from: git commit, DVC experiment, Hydra sweep and job, parent sweep run."""
    tags: dict[str, str] = {}
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    if exp_name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = exp_name
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode.name == "MULTIRUN":
            tags["hydra.sweep_dir"] = str(Path(hydra_cfg.sweep.dir).resolve())
            tags["hydra.job_num"] = str(hydra_cfg.job.num)
            tags["hydra.overrides"] = ",".join(hydra_cfg.overrides.task)
    except ValueError:
        pass  # not inside a Hydra app
    if parent := os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = parent
    return tags


class RunTracker:
    """One MLflow run, driven through `MlflowClient` by explicit run id.

    Used as a context manager around the work: the run ends FINISHED on success, KILLED on Ctrl-C or
    SIGTERM, FAILED (with the reason in the `resnet_lab.failure` tag) on any other exception; never
    left RUNNING. The run id is stored in the output directory so a restarted run continues it.
    """

    def __init__(self, cfg: DictConfig, uri: str, output_dir: Path, run_name: str):
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.uri = uri
        self.output_dir = Path(output_dir)
        self.run_name = run_name
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id: str | None = None
        self.resumed = False

    @classmethod
    def for_training(cls, cfg: DictConfig, output_dir: Path) -> RunTracker:
        uri = tracking_uri(cfg)
        check_reachable(uri)
        return cls(cfg, uri, output_dir, run_name=f"{cfg.model.name}-seed{cfg.seed}")

    def start(self, tags: dict[str, str], extra_params: dict | None = None) -> str:
        """Create the run, or continue the one recorded in the output directory."""
        id_file = self.output_dir / RUN_ID_FILE
        previous = json.loads(id_file.read_text())["run_id"] if id_file.is_file() else None
        if previous and self._run_exists(previous):
            self.run_id, self.resumed = previous, True
            self.client.update_run(previous, status="RUNNING")
            self.client.set_tag(previous, "resnet_lab.resumed", "true")
            return previous
        run = self.client.create_run(
            experiment_id(self.client, self.cfg.tracking.experiment_name, self.uri), run_name=self.run_name, tags={**context_tags(), **tags}
        )
        self.run_id = run.info.run_id
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = id_file.with_name(f".{id_file.name}.tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": mask_password(self.uri)}) + "\n")
        os.replace(tmp, id_file)
        params = flatten(self.cfg)
        params.update({k: str(v) for k, v in (extra_params or {}).items()})
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[start : start + 100])
        return self.run_id

    def _run_exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)} if self.run_id else set()

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_model(self, model, input_example) -> None:
        """Log with MLflow's Keras flavour, with a tensor signature inferred from `input_example`."""
        import keras
        import mlflow
        import tensorflow as tf
        from mlflow.models import infer_signature

        # A signature rather than `input_example=`: the Keras flavour writes the example before it
        # creates the model directory, and fails.
        # A direct call, not predict(): one example cannot be split across a strategy's replicas.
        signature = infer_signature(input_example, keras.ops.convert_to_numpy(model(input_example, training=False)))
        with _fluent_tracking_uri(self.uri), mlflow.start_run(run_id=self.run_id, nested=bool(mlflow.active_run())):
            mlflow.keras.log_model(
                model,
                name="model",
                signature=signature,
                # Pinned here: inferring them loads the model in a subprocess, which costs a minute.
                pip_requirements=[
                    f"tensorflow=={tf.__version__}",
                    f"keras=={keras.__version__}",
                    f"resnet-lab=={__import__('resnet_lab').__version__}",
                ],
            )

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.run_id is None:
            return False
        if exc_type is None:
            self.client.set_terminated(self.run_id, "FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.client.set_terminated(self.run_id, "KILLED")
        else:
            reason = " ".join(f"{exc_type.__name__}: {exc}".split())[:4000]
            self.client.set_tag(self.run_id, "resnet_lab.failure", reason)
            self.client.set_terminated(self.run_id, "FAILED")
        return False


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra-core is a dependency
    _HydraCallback = object


class SweepParentRun(_HydraCallback):
    """A Hydra callback that opens one MLflow parent run per multirun sweep.

    Every job's run carries it as `mlflow.parentRunId` (through the environment, which the joblib
    launcher's worker processes inherit), so the MLflow UI groups a sweep's runs under one row.
    """

    def __init__(self) -> None:
        self.client = None
        self.run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        import atexit

        from mlflow.tracking import MlflowClient

        uri = tracking_uri(config)
        check_reachable(uri)
        self.client = MlflowClient(tracking_uri=uri)
        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        run = self.client.create_run(
            experiment_id(self.client, config.tracking.experiment_name, uri),
            run_name=f"sweep {Path(sweep_dir).name}",
            tags={**context_tags(), "resnet_lab.kind": "sweep", "hydra.sweep_dir": sweep_dir},
        )
        self.run_id = run.info.run_id
        os.environ[PARENT_RUN_ENV] = self.run_id
        # A sweep that dies skips on_multirun_end; the parent must not stay RUNNING.
        atexit.register(self._end, "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._end("FINISHED")

    def _end(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)
            self.run_id = None
            os.environ.pop(PARENT_RUN_ENV, None)
