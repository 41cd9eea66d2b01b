"""The evaluate stage: every trained study member's clean training error and its test metrics, in one process.

    python -m resnet_lab.evaluate [--params params.yaml] [study.models=[plain34] study.seeds=[0]]

For each member it reads `<paths.models_dir>/<model>-<seed>/model.keras` and passes over the training split
in inference mode without augmentation (the study's endpoint: the final training error, as the paper's
Fig. 4 means it, not the running average of an epoch under augmentation and training-mode BN), the
validation split and the test split. It writes `<paths.metrics_dir>/<model>-<seed>.json` (flat numbers for
`dvc metrics`), and `<paths.plots_dir>/confusion/<model>-<seed>.json` (one {"actual", "predicted"} record
per test image, the form of DVC's `confusion` plot template) and `.png`. The numbers and files also go into
the member's MLflow training run, so that one run holds the member's whole story.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from resnet_lab.config import member_name, run_dir, stage_config
from resnet_lab.errors import ConfigError, cli
from resnet_lab.files import staged_files
from resnet_lab.report import plot_confusion_matrix
from resnet_lab.schema import validate
from resnet_lab.tracking import Run, log_dataset_inputs, logged_model_id, tracking_uri

log = logging.getLogger(__name__)

# What the stage logs to the member's MLflow run, split by split.
LOGGED_METRICS = (
    "train_loss", "train_error", "val_loss", "val_error", "test_loss", "test_accuracy", "test_error",
)  # fmt: skip
SPLIT_PREFIX = {"train": "train_", "validation": "val_", "test": "test_"}
ARTIFACT_DIR = "evaluation"


def evaluate_model(model, dataset: Iterable, class_names: Sequence[str], *, progress: bool = True) -> dict:
    """Test metrics of a classifier over a batched dataset, in one pass with Keras's progress bar.

    Args:
        model: a Keras classifier with one output per class, probabilities after a final softmax, else logits.
        dataset: batches of (images, labels), labels as class indices (or one-hot); e.g. a `tf.data.Dataset`.
        class_names: the name of each class, in label order.
        progress: show Keras's progress bar.

    Returns:
        `test_loss` (mean sparse categorical cross-entropy), `test_accuracy`, `test_error` (1 - accuracy),
        `examples`, `per_class_accuracy` (class name -> accuracy, None for a class with no examples),
        `confusion_matrix` (counts, `[actual][predicted]`) and `class_names`.

    Raises:
        ValueError: outputs that are not one column per class, a label out of range, or an empty dataset.
    """
    import keras

    class_names = [str(name) for name in class_names]
    num_classes = len(class_names)
    last = model.layers[-1]  # a softmax (as in resnet_lab.models) gives probabilities, anything else logits
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    from_logits = not (isinstance(last, keras.layers.Softmax) or activation == "softmax")
    batches = int(dataset.cardinality()) if hasattr(dataset, "cardinality") else -1
    progbar = keras.utils.Progbar(batches if batches >= 0 else None, unit_name="batch", verbose=int(progress))

    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum = 0.0
    for step, (images, labels, *_) in enumerate(dataset):
        outputs = np.asarray(model.predict_on_batch(images), dtype=np.float64)
        if outputs.ndim != 2 or outputs.shape[-1] != num_classes:
            raise ValueError(
                f"model outputs shape {outputs.shape}, but there are {num_classes} classes: {class_names}"
            )
        labels = np.asarray(labels)
        if labels.ndim == 2 and labels.shape[-1] == num_classes:  # one-hot, e.g. from a pipeline that smooths
            labels = labels.argmax(axis=-1)
        labels = labels.reshape(-1).astype(np.int64)
        out_of_range = labels[(labels < 0) | (labels >= num_classes)]
        if out_of_range.size:
            raise ValueError(f"label {int(out_of_range[0])} is not a class index in [0, {num_classes})")
        batch_losses = np.asarray(
            keras.losses.sparse_categorical_crossentropy(labels, outputs, from_logits=from_logits)
        )
        predictions = outputs.argmax(axis=-1)
        np.add.at(confusion, (labels, predictions), 1)
        loss_sum += float(batch_losses.sum())
        batch_accuracy = float((predictions == labels).mean())
        progbar.update(step + 1, values=[("loss", float(batch_losses.mean())), ("accuracy", batch_accuracy)])

    examples = int(confusion.sum())
    if examples == 0:
        raise ValueError("the dataset yielded no examples")
    accuracy = float(np.trace(confusion)) / examples
    per_class_total = confusion.sum(axis=1)
    per_class_accuracy = {
        name: (float(confusion[index, index] / per_class_total[index]) if per_class_total[index] else None)
        for index, name in enumerate(class_names)
    }
    return {
        "test_loss": loss_sum / examples,
        "test_accuracy": accuracy,
        "test_error": 1.0 - accuracy,
        "examples": examples,
        "per_class_accuracy": per_class_accuracy,
        "confusion_matrix": confusion.tolist(),
        "class_names": class_names,
    }


def confusion_records(confusion_matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> list[dict]:
    """Expand a confusion matrix into one {"actual": name, "predicted": name} record per example.

    DVC's `confusion` template (`dvc.yaml`: `x: actual, y: predicted`) counts the records itself.
    """
    return [
        {"actual": str(class_names[actual]), "predicted": str(class_names[predicted])}
        for actual, row in enumerate(confusion_matrix)
        for predicted, count in enumerate(row)
        for _ in range(int(count))
    ]


def metrics_path(cfg: DictConfig) -> Path:
    """Where a study member's evaluation numbers go: `<paths.metrics_dir>/<model.name>-<seed>.json`."""
    return Path(cfg.paths.metrics_dir) / f"{member_name(cfg)}.json"


def confusion_dir(cfg: DictConfig) -> Path:
    """Where the members' confusion matrices go, for `dvc plots`: `<paths.plots_dir>/confusion`."""
    return Path(cfg.paths.plots_dir) / "confusion"


def _log_to_training_run(
    cfg: DictConfig, run_id: str, numbers: dict, files: Sequence[Path], *, step: int
) -> None:
    """Add the evaluation to the member's training run, which stays as training ended it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(
            f"MLflow run {run_id!r} of {cfg.model.name} seed {cfg.seed} is not in the store {uri}: {exc}"
        ) from exc
    run = Run(client, run_id)
    test = log_dataset_inputs(run, cfg, ("test",))["test"]
    # MLflow 3's logged models: the test numbers belong to the model and the test dataset as well.
    model_id = logged_model_id(client, run_id)
    run.log_metrics({key: numbers[key] for key in LOGGED_METRICS if not key.startswith("test_")}, step=step)
    test_numbers = {key: numbers[key] for key in LOGGED_METRICS if key.startswith("test_")}
    run.log_metrics(test_numbers, step=step, model_id=model_id, dataset=test)
    for path in files:
        run.log_artifact(path, artifact_path=ARTIFACT_DIR)


def _trained_member(cfg: DictConfig) -> tuple[Path, dict]:
    run_path = run_dir(cfg)
    model_path, summary_path = run_path / "model.keras", run_path / "summary.json"
    for path in (model_path, summary_path):
        if not path.is_file():
            raise ConfigError(
                f"{path} not found: train {cfg.model.name} seed {cfg.seed} first "
                f"(the train stage, `dvc repro train@{member_name(cfg)}`)"
            )
    summary = json.loads(summary_path.read_text())
    trained_on = summary.get("dataset")
    if trained_on and trained_on != cfg.data.name:
        raise ConfigError(f"{run_path} was trained on {trained_on!r}, but data.name is {cfg.data.name!r}")
    return model_path, summary


def evaluate(cfg: DictConfig, *, progress: bool = True) -> dict:
    """Evaluate the study member `cfg.model.name`, `cfg.seed` on every split, and record the result.

    Args:
        cfg: the composed configuration (`paths`, `data`, `model.name`, `seed`, `tracking`).
        progress: show a progress bar per split.

    Returns:
        What `<model>-<seed>.json` holds: `train_loss`, `train_error` (the clean pass), `val_loss`,
        `val_error`, `test_loss`, `test_accuracy`, `test_error`, `examples` (test images) and
        `per_class_accuracy` (test).

    Raises:
        ConfigError: the member was not trained (no run directory, model or summary), was trained on
            another dataset, or its MLflow run is not in the store.
    """
    member = member_name(cfg)
    model_path, summary = _trained_member(cfg)

    import keras

    import resnet_lab.models  # noqa: F401  registers the custom layers a saved model refers to
    from resnet_lab.data import dataset_info, make_dataset

    model = keras.saving.load_model(model_path, compile=False)
    class_names = [str(name) for name in dataset_info(cfg)["class_names"]]
    numbers: dict = {}
    for split, prefix in SPLIT_PREFIX.items():
        results = evaluate_model(
            model, make_dataset(split, cfg, training=False), class_names, progress=progress
        )
        numbers[f"{prefix}loss"] = results["test_loss"]
        numbers[f"{prefix}error"] = results["test_error"]
    # The last split is the test split.
    numbers |= {key: results[key] for key in ("test_accuracy", "examples", "per_class_accuracy")}

    out_path, plots = metrics_path(cfg), confusion_dir(cfg)
    with staged_files(plots) as staging:
        records = confusion_records(results["confusion_matrix"], class_names)
        (staging / f"{member}.json").write_text(json.dumps(records) + "\n")
        plot_confusion_matrix(
            results["confusion_matrix"],
            class_names,
            staging / f"{member}.png",
            title=f"{member} on {cfg.data.name} test: {100 * results['test_error']:.2f}% error",
        )
    with staged_files(out_path.parent) as staging:
        (staging / out_path.name).write_text(json.dumps(numbers, indent=2) + "\n")
    # The confusion records are for `dvc plots`; MLflow gets the numbers and the picture.
    files = [out_path, plots / f"{member}.png"]

    if cfg.tracking.get("enabled", True):  # tracking=off logs nothing
        if run_id := summary.get("mlflow_run_id"):
            _log_to_training_run(cfg, run_id, numbers, files, step=int(summary.get("epochs", 0)))
        else:
            log.warning("%s has no mlflow_run_id: the evaluation is not logged to MLflow", run_dir(cfg))
    return numbers


def study_members(cfg: DictConfig) -> list[DictConfig]:
    """One configuration per study member (`study.models` x `study.seeds`), models outer.

    Raises:
        ConfigError: the study has no models or no seeds.
    """
    models, seeds = list(cfg.study.models), [int(seed) for seed in cfg.study.seeds]
    if not models or not seeds:
        raise ConfigError(f"the study needs models and seeds; study.models={models}, study.seeds={seeds}")
    return [
        OmegaConf.merge(cfg, {"model": {"name": model}, "seed": seed}) for model in models for seed in seeds
    ]


def evaluate_study(cfg: DictConfig) -> dict[str, dict]:
    """`evaluate` every study member in this one process (TensorFlow starts once, not once a member).

    Bad input or an untrained member fails in one line, before any member is evaluated.

    Returns:
        member name -> what `evaluate` returned.
    """
    from tqdm import tqdm

    validate(cfg)
    members = study_members(cfg)
    for member_cfg in members:
        _trained_member(member_cfg)
    return {
        member_name(member_cfg): evaluate(member_cfg, progress=False)
        for member_cfg in tqdm(members, desc="evaluate", unit="member")
    }


@cli
def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m resnet_lab.evaluate [--params params.yaml] [KEY=VALUE ...]``."""
    cfg = stage_config(argv, description="Evaluate every trained study member on every split.")
    for member, numbers in evaluate_study(cfg).items():
        print(
            f"{member}: training error (clean) {100 * numbers['train_error']:.2f}%, "
            f"test error {100 * numbers['test_error']:.2f}% over {numbers['examples']} images"
        )
    print(f"-> {cfg.paths.metrics_dir}/, {confusion_dir(cfg)}/")


if __name__ == "__main__":
    main()
