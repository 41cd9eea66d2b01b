"""Shared fixtures: the real `conf/` composed with tiny overrides, digits prepared once, a real MLflow server.

Everything a test writes goes under pytest's temporary directories: data, models, the MLflow store.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.pop("MLFLOW_TRACKING_URI", None)

from resnet_lab.config import compose  # noqa: E402

# A CIFAR-layout net with one unit per stage on 8x8 digits: every code path, in seconds.
# Padding 1 of 8 pixels is the paper's 4 of 32.
TINY = (
    "model=resnet8",
    "data.image_size=8",
    "data.pad_crop=1",
    "trainer=cpu_smoke",
    "tracking.log_model=false",
)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """Digits built with the real TFDS builder and prepared once for the session (read-only for tests)."""
    from resnet_lab.prepare import prepare

    root = tmp_path_factory.mktemp("digits")
    prepare(compose([f"paths.data_dir={root}/tfds", f"paths.prepared_dir={root}/prepared"]))
    return root


def path_overrides(data_root: Path, work: Path) -> list[str]:
    """Point every path of the configuration into temporary directories."""
    return [
        f"paths.data_dir={data_root}/tfds",
        f"paths.prepared_dir={data_root}/prepared",
        f"paths.models_dir={work}/models",
        f"paths.checkpoints_dir={work}/checkpoints",
        f"paths.metrics_dir={work}/metrics",
        f"paths.reports_dir={work}/reports",
        f"tracking.uri=sqlite:///{work}/mlflow.db",
    ]


@pytest.fixture
def tiny_cfg(digits_root, tmp_path):
    """`tiny_cfg(*overrides)`: the real conf/ composed for a tiny run writing under `tmp_path`."""

    def make(*overrides: str):
        return compose([*TINY, *path_overrides(digits_root, tmp_path), *overrides])

    return make


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(args, cwd, *, timeout=240, env_extra=None, check=False) -> subprocess.CompletedProcess:
    """A command as a user types it: this interpreter's `python`, `dvc` and `mlflow` first on PATH, no
    MLFLOW_TRACKING_URI from the caller, TensorFlow's C++ logs quiet. `args[0]` may be a module
    (`resnet_lab.train`), run as `python -m`.

    Raises:
        AssertionError: with `check`, a non-zero exit, showing the ends of stdout and stderr.
    """
    if str(args[0]).startswith("resnet_lab."):
        args = [sys.executable, "-m", *args]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@127.0.0.1",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@127.0.0.1",
        **(env_extra or {}),
    }  # fmt: skip
    if "MLFLOW_TRACKING_URI" not in (env_extra or {}):
        env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode:
        raise AssertionError(
            f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend (`.uri`, `.kill()`, `.start()`), stopped
    afterwards."""
    server = MlflowServer(tmp_path / "server").start()
    try:
        yield server
    finally:
        server.stop()


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend, in its own process group.

    `kill()` takes it away at once (SIGKILL to the whole group: uvicorn runs in a child process);
    `start()` brings it back on the same port and store. MLflow 3's job runner is switched off: the
    tests need none of it, and its consumers outlive a terminated server.
    """

    def __init__(self, store: Path):
        self.store = store
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        store.mkdir(parents=True, exist_ok=True)

    def start(self, timeout_s: float = 120) -> MlflowServer:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.store}/mlflow.db",
                "--artifacts-destination",
                str(self.store / "artifacts"),
            ],  # fmt: skip
            cwd=self.store,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server on {self.uri} did not start")
            time.sleep(0.3)
        return self

    def answers(self) -> bool:
        try:
            return requests.get(f"{self.uri}/health", timeout=1).ok
        except requests.RequestException:
            return False

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM, wait_s=20)

    def _signal(self, signum: int, wait_s: float = 10) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signum)
            self.process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass
        # The group's other members (uvicorn) go with SIGKILL; a SIGTERM'd parent may leave them.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None


# The longest modules first: with `pytest -n 2 --dist loadfile` (pyproject's addopts) each module runs on
# one worker, and one that started last would run on alone at the end.
_LONGEST_FIRST = ("test_pipeline.py", "test_scale_out.py", "test_faults.py", "test_bench.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
