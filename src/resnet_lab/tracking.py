"""MLflow plumbing shared by training, evaluation and the report: where the store is, and what to tag.

    python -m resnet_lab.tracking replay models/resnet34-0/mlflow_unsent.jsonl

A run whose tracking server went away keeps training and appends what it could not send to
`<output dir>/mlflow_unsent.jsonl`; the next record that gets through sends the file first, and `replay`
sends it by hand (the run's end included) once the server is back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from resnet_lab.errors import ConfigError, cli

log = logging.getLogger(__name__)

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
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        # A parallel job created it first.
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


PARENT_RUN_ENV = "RESNET_LAB_PARENT_RUN_ID"
RUN_ID_FILE = "mlflow_run.json"
UNSENT_FILE = "mlflow_unsent.jsonl"
OUTAGE_TAG = "resnet_lab.tracking_outage"
# MLflow retries a refused connection for about four minutes (7 retries, backoff factor 2): once per
# epoch, that would stall training for as long as the server is away. Two quick retries ride out a
# restart; then the records go to UNSENT_FILE. Values set in the environment win.
_QUICK_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


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


_PASSWORD_IN_URI = re.compile(r"(://[^/\s:@]+\\?:)[^/\s@]+@")


def masked_yaml(cfg: DictConfig) -> str:
    """The resolved configuration as YAML with any password in a URI masked: the `config.yaml` a run logs."""
    from omegaconf import OmegaConf

    def mask(node):
        if isinstance(node, dict):
            return {key: mask(value) for key, value in node.items()}
        if isinstance(node, list):
            return [mask(value) for value in node]
        return mask_password(node) if isinstance(node, str) else node

    return OmegaConf.to_yaml(mask(OmegaConf.to_container(cfg, resolve=True)))


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
            raise ConfigError(
                f"cannot reach the MLflow tracking server at {shown}: {type(exc).__name__}"
            ) from None
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
            # Hydra escapes the overrides (http\://user\:secret@host): masked as text, not parsed.
            tags["hydra.overrides"] = _PASSWORD_IN_URI.sub(r"\1***@", ",".join(hydra_cfg.overrides.task))
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
        self._away = False  # the tracking store stopped answering; records go to unsent_file

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
            experiment_id(self.client, self.cfg.tracking.experiment_name, self.uri),
            run_name=self.run_name,
            tags={**context_tags(), **tags},
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
        now = int(time.time() * 1000)
        self._send({"metrics": {k: float(v) for k, v in metrics.items()}, "step": step, "timestamp": now})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._send({"artifact": str(Path(path).resolve()), "artifact_path": artifact_path})

    @property
    def unsent_file(self) -> Path:
        return self.output_dir / UNSENT_FILE

    def _send(self, record: dict, send=None) -> None:
        """Send one record to the run; while the tracking store is away, append it to `unsent_file`.

        The first record that gets through again sends the file's records before it, in order.

        Args:
            record: what `_apply` sends, and what the file keeps.
            send: sends the record another way while the store answers (a model in memory).
        """
        record = {"run_id": self.run_id, **record}
        if self._away and not _answers(self.uri):
            self._keep(record, None)
            return
        try:
            with _signals_held(), _quick_retries():
                if self.unsent_file.is_file():
                    # Another process's end of run is stale once this one continues the run.
                    replay_unsent(self.unsent_file, self.client, finish=False)
                if send is None:
                    _apply(self.client, record)
                else:
                    send()
        except Exception as exc:
            if not _unreachable(exc):
                raise
            self._keep(record, exc)
            return
        self._away = False

    def _keep(self, record: dict, exc: Exception | None) -> None:
        with self.unsent_file.open("a") as file:
            file.write(json.dumps({**record, "tracking_uri": mask_password(self.uri)}) + "\n")
        if exc is not None and not self._away:
            log.warning(
                "MLflow tracking at %s is unreachable (%s); training goes on and writes what it cannot "
                "send to %s: it is sent when the server answers again, or by `python -m resnet_lab.tracking "
                "replay %s`",
                mask_password(self.uri), " ".join(str(exc).split())[:200], self.unsent_file, self.unsent_file,
            )  # fmt: skip
        self._away = True

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_model(self, model, input_example) -> None:
        """Log with MLflow's Keras flavour, with a tensor signature inferred from `input_example`.

        While the store is away, `replay_unsent` logs the copy saved as `model.keras` in the output
        directory instead.
        """
        self._send(
            {"model": str((self.output_dir / "model.keras").resolve())},
            lambda: _log_keras_model(self.uri, self.run_id, model, input_example),
        )

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.run_id is None:
            return False
        end = {"status": "FINISHED", "end_time": int(time.time() * 1000)}
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            end["status"] = "KILLED"
        elif exc_type is not None:
            end.update(status="FAILED", failure=" ".join(f"{exc_type.__name__}: {exc}".split())[:4000])
        self._send(end)
        if self._away:
            log.warning(
                "MLflow run %s stays RUNNING at %s until `python -m resnet_lab.tracking replay %s` sends "
                "its last records and its end (%s)",
                self.run_id, mask_password(self.uri), self.unsent_file, end["status"],
            )  # fmt: skip
        return False


class NoTracking:
    """What a worker other than the chief of a multi-worker run records: nothing (the chief does)."""

    run_id = None
    resumed = False

    def start(self, tags: dict[str, str], extra_params: dict | None = None) -> None:
        return None

    def logged_steps(self, key: str) -> set[int]:
        return set()

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_model(self, model, input_example) -> None:
        pass

    def __enter__(self) -> NoTracking:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
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


def _answers(uri: str) -> bool:
    """A cheap probe while the store is away: an HTTP server's health check, anything else is tried."""
    if not uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        return requests.get(uri.rstrip("/") + "/health", timeout=2).ok
    except requests.RequestException:
        return False


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
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum, handler in previous.items():
        if handler is not None:
            signal.signal(signum, lambda number, frame: held.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:
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
    return isinstance(exc, MlflowException) and exc.error_code in (
        "INTERNAL_ERROR",
        "TEMPORARILY_UNAVAILABLE",
    )


def _log_keras_model(uri: str, run_id: str, model, input_example) -> None:
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import infer_signature

    # A signature rather than `input_example=`: the Keras flavour writes the example before it
    # creates the model directory, and fails.
    # A direct call, not predict(): one example cannot be split across a strategy's replicas.
    signature = infer_signature(
        input_example, keras.ops.convert_to_numpy(model(input_example, training=False))
    )
    with (
        _fluent_tracking_uri(uri),
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
                f"resnet-lab=={__import__('resnet_lab').__version__}",
            ],
        )


def _apply(client, record: dict, sent_steps: dict | None = None) -> None:
    """Send one record (metrics, an artifact, or the run's end) to run `record["run_id"]`."""
    from mlflow.entities import Metric

    run_id = record["run_id"]
    if "metrics" in record:
        metrics = record["metrics"]
        if sent_steps is not None:
            # A request that timed out may have reached the server: never log a step twice.
            for key in metrics:
                if key not in sent_steps:
                    sent_steps[key] = {m.step for m in client.get_metric_history(run_id, key)}
            metrics = {k: v for k, v in metrics.items() if record["step"] not in sent_steps[k]}
        client.log_batch(
            run_id, metrics=[Metric(k, v, record["timestamp"], record["step"]) for k, v in metrics.items()]
        )
    elif "artifact" in record:
        if Path(record["artifact"]).exists():
            client.log_artifact(run_id, record["artifact"], record.get("artifact_path"))
        else:
            log.warning("%s is gone: not logged to MLflow run %s", record["artifact"], run_id)
    elif "model" in record:
        if not Path(record["model"]).is_file():
            log.warning("%s is gone: no model logged to MLflow run %s", record["model"], run_id)
            return
        import keras
        import numpy as np

        import resnet_lab.models  # noqa: F401  registers the custom layers a saved model refers to

        model = keras.saving.load_model(record["model"], compile=False)
        example = np.zeros((1, *model.input_shape[1:]), dtype="float32")
        _log_keras_model(client.tracking_uri, run_id, model, example)
    elif "status" in record:
        if record.get("failure"):
            client.set_tag(run_id, "resnet_lab.failure", record["failure"])
        client.set_terminated(run_id, record["status"], end_time=record.get("end_time"))


def replay_unsent(path: str | os.PathLike, client=None, *, finish: bool = True) -> int:
    """Send the records of a fallback file to their MLflow runs, oldest first.

    Sent records leave the file, which is removed once empty; on a failure the rest stays for next time.
    Each run gets the `resnet_lab.tracking_outage` tag saying how many records came late.

    Args:
        path: an `mlflow_unsent.jsonl` that `RunTracker` wrote.
        client: an `MlflowClient`; one for the URI recorded in the file when None.
        finish: also apply the runs' recorded ends (FINISHED, FAILED, KILLED); a live run catching up
            drops them.

    Returns:
        The number of records sent.
    """
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            # Only the last line can be cut short, by a kill during the write.
            log.warning("%s:%d is not a complete record: skipped", path, number)
    if client is None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=records[0]["tracking_uri"]) if records else None
    sent_steps: dict[str, dict] = {}
    late: dict[str, int] = {}
    sent = 0
    try:
        for record in records:
            if "status" not in record:
                _apply(client, record, sent_steps.setdefault(record["run_id"], {}))
                late[record["run_id"]] = late.get(record["run_id"], 0) + 1
            elif finish:
                _apply(client, record)
            sent += 1
        for run_id, count in late.items():
            client.set_tag(run_id, OUTAGE_TAG, f"{count} records logged late from {UNSENT_FILE}")
    except Exception:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in records[sent:]))
        os.replace(tmp, path)
        raise
    path.unlink()
    return sent


@cli
def main(argv: Sequence[str] | None = None) -> None:
    """`python -m resnet_lab.tracking replay FILE [--uri URI]`: send what a run could not.

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` when None.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m resnet_lab.tracking", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser("replay", help=f"send a run's {UNSENT_FILE} to its MLflow run")
    replay.add_argument("file", type=Path)
    replay.add_argument(
        "--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, else the one recorded in FILE)"
    )
    args = parser.parse_args(argv)
    if not args.file.is_file():
        raise ConfigError(f"{args.file} not found")
    uri = args.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        first = next((line for line in args.file.read_text().splitlines() if line.strip()), None)
        uri = json.loads(first)["tracking_uri"] if first else None
        if uri and ":***@" in uri:
            raise ConfigError(f"{args.file} records {uri} without its password: pass --uri")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri) if uri else None
    if uri:
        check_reachable(uri)
    count = replay_unsent(args.file, client)
    print(f"sent {count} records from {args.file} to {mask_password(uri or '')}")


if __name__ == "__main__":
    main()
