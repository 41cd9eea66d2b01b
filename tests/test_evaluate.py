"""The evaluate stage: metrics of a tiny model whose predictions are known, and the stage end to end on
the digits dataset prepared into a temporary directory, logging into the member's MLflow training run (a
real SQLite store in `tmp_path`)."""

from __future__ import annotations

import json
import math
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from mlflow import MlflowClient
from omegaconf import OmegaConf

from resnet_lab.config import compose
from resnet_lab.errors import ConfigError
from resnet_lab.evaluate import confusion_records, evaluate, evaluate_model, main
from resnet_lab.tracking import _log_model_once

CLASS_NAMES = ["zero", "one", "two"]
# Each input is the one-hot of the class the model predicts; the labels disagree twice.
INPUT_CLASSES = [0, 1, 2, 0, 1, 2]
LABELS = [0, 1, 2, 1, 1, 0]
LOGIT_SCALE = 5.0


def _model(*, softmax: bool = True) -> keras.Model:
    """Logits `LOGIT_SCALE * x`: the predicted class is the input's hot index, with a known confidence."""
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(
        3, use_bias=False, activation="softmax" if softmax else None, name="predictions"
    )
    model = keras.Model(inputs, dense(inputs))
    dense.set_weights([LOGIT_SCALE * np.eye(3, dtype="float32")])
    return model


def _dataset(*, one_hot: bool = False, batch_size: int = 4) -> tf.data.Dataset:
    images = np.eye(3, dtype="float32")[INPUT_CLASSES]
    labels = np.eye(3, dtype="float32")[LABELS] if one_hot else np.asarray(LABELS, dtype="int64")
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)


def _expected_loss() -> float:
    right = math.exp(LOGIT_SCALE) / (math.exp(LOGIT_SCALE) + 2)
    wrong = 1 / (math.exp(LOGIT_SCALE) + 2)
    return -(4 * math.log(right) + 2 * math.log(wrong)) / 6


def test_evaluate_model_known_answers():
    results = evaluate_model(_model(), _dataset(), CLASS_NAMES)

    assert results["examples"] == 6
    assert results["test_accuracy"] == pytest.approx(4 / 6)
    assert results["test_error"] == pytest.approx(2 / 6)
    assert results["test_loss"] == pytest.approx(_expected_loss(), rel=1e-5)
    assert results["per_class_accuracy"] == pytest.approx({"zero": 0.5, "one": 2 / 3, "two": 1.0})
    assert results["confusion_matrix"] == [[1, 0, 1], [1, 2, 0], [0, 0, 1]]
    json.dumps(results)


def test_evaluate_model_loss_matches_keras():
    model = _model()
    images, labels = next(iter(_dataset(batch_size=6)))
    keras_loss = float(keras.ops.mean(keras.losses.sparse_categorical_crossentropy(labels, model(images))))

    assert evaluate_model(model, _dataset(), CLASS_NAMES)["test_loss"] == pytest.approx(keras_loss, rel=1e-5)


def test_evaluate_model_reads_logits_and_one_hot_labels():
    from_logits = evaluate_model(_model(softmax=False), _dataset(one_hot=True), CLASS_NAMES)

    assert from_logits["test_loss"] == pytest.approx(_expected_loss(), rel=1e-5)
    assert from_logits["confusion_matrix"] == [[1, 0, 1], [1, 2, 0], [0, 0, 1]]


def test_evaluate_model_class_without_examples_and_bad_input():
    images = np.eye(3, dtype="float32")[[0, 1]]
    dataset = tf.data.Dataset.from_tensor_slices((images, np.asarray([0, 1]))).batch(2)
    assert evaluate_model(_model(), dataset, CLASS_NAMES)["per_class_accuracy"]["two"] is None

    with pytest.raises(ValueError, match="there are 2 classes"):
        evaluate_model(_model(), _dataset(), ["zero", "one"])
    bad_labels = tf.data.Dataset.from_tensor_slices((images, np.asarray([0, 7]))).batch(2)
    with pytest.raises(ValueError, match="label 7 is not a class index"):
        evaluate_model(_model(), bad_labels, CLASS_NAMES)
    with pytest.raises(ValueError, match="no examples"):
        evaluate_model(_model(), _dataset().take(0), CLASS_NAMES)


def test_confusion_records_one_per_example():
    records = confusion_records([[1, 0, 1], [1, 2, 0], [0, 0, 1]], CLASS_NAMES)

    assert len(records) == 6
    assert records.count({"actual": "one", "predicted": "one"}) == 2
    assert {"actual": "zero", "predicted": "two"} in records


DIGITS_OVERRIDES = ["data=digits", "data.image_size=16", "trainer.batch_size=128"]


@pytest.fixture(scope="module")
def digits_dirs(tmp_path_factory):
    """The digits dataset prepared once for this module, and a saved untrained resnet8 for its images.

    resnet8 (CIFAR layout, option A shortcuts) also checks that the stage can load `ZeroPadShortcut`.
    """
    from resnet_lab.models import build_model
    from resnet_lab.prepare import prepare

    root = tmp_path_factory.mktemp("digits")
    data_overrides = [f"paths.data_dir={root}/tfds", f"paths.prepared_dir={root}/prepared"]
    prepare(compose(DIGITS_OVERRIDES + data_overrides))
    keras.utils.set_random_seed(0)
    model_path = root / "model.keras"
    build_model("resnet8", 10, (16, 16, 1)).save(model_path)
    return data_overrides, model_path


@pytest.fixture
def member_cfg(tmp_path, monkeypatch, digits_dirs):
    """A trained member `resnet8-0` on digits: its saved model, its summary, and its MLflow training run."""
    data_overrides, model_path = digits_dirs
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose(
        DIGITS_OVERRIDES
        + data_overrides
        + [
            "model=resnet8",
            "seed=0",
            f"paths.models_dir={tmp_path}/models",
            f"paths.metrics_dir={tmp_path}/metrics",
            f"paths.plots_dir={tmp_path}/plots",
            "study.models=[resnet8]",
            "study.seeds=[0]",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        ]
    )
    # MLflow puts a new experiment's artifacts under ./mlruns.
    monkeypatch.chdir(tmp_path)
    run_path = tmp_path / "models" / "resnet8-0"
    run_path.mkdir(parents=True)
    shutil.copy(model_path, run_path / "model.keras")
    client = MlflowClient(tracking_uri=str(cfg.tracking.uri))
    run = client.create_run(client.create_experiment("training"), run_name="resnet8-0")
    _log_model_once(client, run.info.run_id, model_path)
    client.set_terminated(run.info.run_id)
    summary = {
        "model": "resnet8",
        "seed": 0,
        "epochs": 3,
        "mlflow_run_id": run.info.run_id,
        "dataset": "digits",
    }
    (run_path / "summary.json").write_text(json.dumps(summary))
    return cfg


def test_evaluate_stage_end_to_end_on_digits(member_cfg, tmp_path):
    from resnet_lab.data import make_dataset

    returned = evaluate(member_cfg)

    assert sorted(path.name for path in (tmp_path / "metrics").iterdir()) == ["resnet8-0.json"]
    numbers = json.loads((tmp_path / "metrics" / "resnet8-0.json").read_text())
    assert numbers == returned
    assert numbers["examples"] == 360
    assert set(numbers["per_class_accuracy"]) == {str(digit) for digit in range(10)}
    for key in (
        "train_loss",
        "train_error",
        "val_loss",
        "val_error",
        "test_loss",
        "test_accuracy",
        "test_error",
    ):
        assert isinstance(numbers[key], float), key
    assert numbers["test_error"] == pytest.approx(1 - numbers["test_accuracy"])
    # The same numbers as Keras's own evaluation of the saved model, in inference mode, on the same splits:
    # the training split too (the study's endpoint), without augmentation.
    model = keras.saving.load_model(tmp_path / "models" / "resnet8-0" / "model.keras", compile=False)
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    for split, prefix in (("train", "train_"), ("validation", "val_"), ("test", "test_")):
        loss, accuracy = model.evaluate(make_dataset(split, member_cfg, training=False), verbose=0)
        assert numbers[f"{prefix}loss"] == pytest.approx(loss, rel=1e-4), split
        assert numbers[f"{prefix}error"] == pytest.approx(1 - accuracy, abs=1e-6), split

    plots = tmp_path / "plots" / "confusion"
    assert sorted(path.name for path in plots.iterdir()) == ["resnet8-0.json", "resnet8-0.png"]
    records = json.loads((plots / "resnet8-0.json").read_text())
    assert len(records) == 360 and set(records[0]) == {"actual", "predicted"}
    assert sum(r["actual"] == r["predicted"] for r in records) == round(360 * numbers["test_accuracy"])
    assert (plots / "resnet8-0.png").read_bytes()[:4] == b"\x89PNG"
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]

    client = MlflowClient(tracking_uri=str(member_cfg.tracking.uri))
    run_id = json.loads((tmp_path / "models" / "resnet8-0" / "summary.json").read_text())["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.data.metrics["test_error"] == pytest.approx(numbers["test_error"])
    assert run.data.metrics["train_error"] == pytest.approx(numbers["train_error"])
    assert [metric.step for metric in client.get_metric_history(run_id, "test_loss")] == [3]
    artifacts = {artifact.path for artifact in client.list_artifacts(run_id, "evaluation")}
    assert artifacts == {"evaluation/resnet8-0.json", "evaluation/resnet8-0.png"}
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert "digits-test" in {i.dataset.name for i in run.inputs.dataset_inputs}
    # The test numbers are the logged model's too, linked to the test dataset.
    (logged,) = client.search_logged_models([run.info.experiment_id])
    linked = {m.key: m for m in client.get_logged_model(logged.model_id).metrics}
    assert linked["test_error"].value == pytest.approx(numbers["test_error"])
    assert linked["test_error"].dataset_name == "digits-test" and "train_error" not in linked


def test_evaluate_stage_without_a_trained_model(member_cfg, tmp_path):
    cfg = OmegaConf.merge(member_cfg, {"seed": 1})
    with pytest.raises(
        ConfigError, match=r"models/resnet8-1/model.keras not found: train resnet8 seed 1 first"
    ):
        evaluate(cfg)


def test_evaluate_stage_refuses_another_dataset(member_cfg):
    with pytest.raises(ConfigError, match="trained on 'digits', but data.name is 'cifar10'"):
        evaluate(OmegaConf.merge(member_cfg, {"data": {"name": "cifar10"}}))


def test_evaluate_command_line_evaluates_every_member(member_cfg, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    OmegaConf.save(member_cfg, params)

    # A second seed that was never trained: one error line before any member is evaluated.
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", str(params), "study.seeds=[0,5]"])
    assert exit_info.value.code == 2
    assert "resnet8-5/model.keras not found: train resnet8 seed 5 first" in capsys.readouterr().err
    assert not (tmp_path / "metrics").exists()

    shutil.copytree(tmp_path / "models" / "resnet8-0", tmp_path / "models" / "resnet8-1")
    main(["--params", str(params), "study.seeds=[0,1]"])
    out = capsys.readouterr().out
    assert "resnet8-0: training error (clean) " in out and "resnet8-1: training error (clean) " in out
    assert sorted(path.name for path in (tmp_path / "metrics").iterdir()) == [
        "resnet8-0.json",
        "resnet8-1.json",
    ]
