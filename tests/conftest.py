"""Shared fixtures: the real `conf/` composed with tiny overrides, digits prepared once, a real MLflow server.

Everything a test writes goes under pytest's temporary directories: data, models, the MLflow store.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend; yields its URI, stops it afterwards."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{store}/mlflow.db",
            "--artifacts-destination",
            str(store / "artifacts"),
        ],  # fmt: skip
        cwd=store,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        import requests

        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{uri}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server on {uri} did not start")
            time.sleep(0.5)
        yield uri
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


# The longest modules first: with `pytest -n 2 --dist loadfile` (pyproject's addopts) each module runs on
# one worker, and one that started last would run on alone at the end.
_LONGEST_FIRST = ("test_pipeline.py", "test_scale_out.py", "test_faults.py", "test_bench.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
