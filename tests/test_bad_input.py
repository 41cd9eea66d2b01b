"""Bad configurations and command lines: each costs one `error:` line naming the bad value, exit status 2,
and leaves no MLflow run and no output behind.

The stage entry points (`train --params`, `prepare`, `evaluate`, `compare`) run in-process through their
`main(argv)`, which is what `python -m` calls; a few real command lines run in subprocesses, chiefly
Hydra's, whose errors come from Hydra before any of our code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from conftest import TINY, free_port, path_overrides, run_cli
from resnet_lab import compare, evaluate, prepare
from resnet_lab.config import compose
from resnet_lab.train import stage_main

T, P = stage_main, prepare.main
# id, entry point, arguments after `--params params.yaml`, what the one error line says. `{tmp}` is the
# test's temporary directory, `{port}` a port nothing listens on.
# fmt: off
STAGE_CASES = [
    ("unknown model", T, ["model.name=resnet9"], "unknown model 'resnet9'; choose one of"),
    ("unknown dataset (train)", T, ["data.name=cifar11"], "unknown dataset data.name='cifar11'; did you"),
    ("dataset not prepared", T, ["data.name=cifar100"], "cifar100/dataset.json not found: prepare cifar100"),
    ("unknown dataset", P, ["data.name=cifar11"], "unknown dataset data.name='cifar11'"),
    ("unknown optimizer", T, ["optimizer.name=rmsprop"], "unknown optimizer.name 'rmsprop'; choose"),
    ("unknown schedule", T, ["schedule.name=poly"], "unknown schedule.name 'poly'"),
    ("unknown precision", T, ["trainer.precision=float8"], "unknown trainer.precision 'float8'"),
    ("unknown strategy", T, ["trainer.distribution=tpu"], "unknown trainer.distribution 'tpu'"),
    ("unknown stem", T, ["model.stem=vgg"], "unknown model.stem 'vgg'; choose one of ['cifar', 'imagenet']"),
    ("unknown shortcut", T, ["model.shortcut=C"], "unknown model.shortcut 'C'; choose one of ['A', 'B']"),
    ("epochs a string", T, ["trainer.epochs=abc"], "trainer.epochs must be an integer, got 'abc'"),
    ("batch a float", T, ["trainer.batch_size=1.5"], "trainer.batch_size must be an integer, got 1.5"),
    ("batch a bool", T, ["trainer.batch_size=true"], "trainer.batch_size must be an integer, got True"),
    ("zero epochs", T, ["trainer.epochs=0"], "trainer.epochs must be a positive integer, got 0"),
    ("negative batch", T, ["trainer.batch_size=-4"], "batch_size must be a positive integer, got -4"),
    ("zero steps", T, ["trainer.steps_per_epoch=0"], "steps_per_epoch must be a positive integer or null"),
    ("batch over the data", T, ["trainer.batch_size=5000"], "trainer.batch_size 5000 is larger than the"),
    ("zero image", T, ["data.image_size=0"], "data.image_size must be a positive integer, got 0"),
    ("image under stride", T, ["data.image_size=2"], "input 2x2 is smaller than resnet8's total stride 4"),
    ("negative pad", T, ["data.pad_crop=-1"], "pad_crop must be a non-negative integer, got -1"),
    ("zero lr", T, ["optimizer.learning_rate=0"], "learning_rate must be positive, got 0"),
    ("negative wd", T, ["optimizer.weight_decay=-1"], "optimizer.weight_decay must be >= 0, got -1"),
    ("smoothing 1", T, ["trainer.label_smoothing=1.0"], "label_smoothing must be in [0, 1), got 1.0"),
    ("long warm-up", T, ["schedule.warmup_epochs=5"], "warmup_epochs must be in [0, trainer.epochs=1)"),
    ("bn momentum 1.5", T, ["model.bn_momentum=1.5"], "bn_momentum must be in [0, 1), got 1.5"),
    ("val fraction 0", P, ["data.validation_fraction=0"], "fraction must be a number in (0, 1), got 0"),
    ("val fraction 1", P, ["data.validation_fraction=1"], "fraction must be a number in (0, 1), got 1"),
    ("split seed", P, ["data.split_seed=-1"], "split_seed must be an integer in [0, 2**32), got -1"),
    ("server down", T, ["tracking.uri=http://127.0.0.1:{port}"], "cannot reach the MLflow tracking server"),
    ("store dir missing", T, ["tracking.uri=sqlite:///{tmp}/a/m.db"], "'{tmp}/a' does not exist"),
    ("unknown key", T, ["trainer.epochz=3"], "{tmp}/params.yaml has no key 'trainer.epochz'"),
    ("override without =", T, ["trainer.epochs"], "override 'trainer.epochs' is not KEY=VALUE"),
    ("a sweep at a stage", T, ["seed=1,2"], "override 'seed=1,2': a stage takes KEY=VALUE only"),
    ("params lack a key", T, ["--params", "{tmp}/missing.yaml"], "has no value for trainer.epochs"),
    ("no params.yaml", T, ["--params", "{tmp}/nope.yaml"], "{tmp}/nope.yaml not found"),
    ("params.yaml a list", T, ["--params", "{tmp}/list.yaml"], "list.yaml must hold a mapping"),
    ("evaluate untrained", evaluate.main, [], "model.keras not found: train plain18 seed 10 first"),
    ("empty study", compare.main, ["study.models=[]"], "the study needs models and seeds"),
    ("model in no claim", compare.main, ["study.models=[plain18,plain34,resnet18,resnet34,resnet50,resnet8]"],
     "study.models ['resnet8'] take part in no claim"),
    ("no claims", compare.main, ["study.claims=[]"], "take part in no claim of study.claims"),
    ("alpha 1", compare.main, ["study.alpha=1"], "study.alpha must be in (0, 0.5), got 1"),
    ("unknown test", compare.main, ["study.test=ttest"], "unknown study.test 'ttest'; choose one of"),
    ("width 0", T, ["model.width=0"], "model.width must be a positive integer or null, got 0"),
    ("reference batch", T, ["optimizer.reference_batch_size=0"], "reference_batch_size must be a positive"),
    ("warm-up factor", T, ["schedule.warmup_epochs=0.5", "schedule.warmup_factor=2"], "warmup_factor must"),
    ("output under a file", T, ["paths.models_dir={tmp}/a_file"], "'{tmp}/a_file' is a file"),
    ("negative seed", T, ["seed=-1"], "seed must be an integer in [0, 2**32), got -1"),
    ("seed a string", T, ["seed=abc"], "seed must be an integer, got 'abc'"),
    ("lr a string", T, ["optimizer.learning_rate=abc"], "learning_rate must be a number, got 'abc'"),
    ("smoothing a string", T, ["trainer.label_smoothing=abc"], "smoothing must be a number, got 'abc'"),
    ("momentum a string", T, ["optimizer.momentum=abc"], "momentum must be a number, got 'abc'"),
    ("cpus a string", T, ["trainer.logical_cpus=abc"], "logical_cpus must be an integer or null, got 'abc'"),
    ("flag a string", T, ["trainer.deterministic=maybe"], "must be true or false, got 'maybe'"),
    ("negative lr factor", T, ["schedule.factor=-1"], "schedule.factor must be in (0, 1], got -1"),
]
# fmt: on
def _cases(table):
    return [pytest.param(*case, id=case_id) for case_id, *case in table]


@pytest.fixture
def params_file(digits_root, tmp_path) -> Path:
    """params.yaml as DVC composes it, with every path in `tmp_path`, and some broken variants beside it."""
    cfg = compose([*TINY, *path_overrides(digits_root, tmp_path)])
    OmegaConf.save(cfg, tmp_path / "params.yaml")
    missing = OmegaConf.load(tmp_path / "params.yaml")
    del missing.trainer["epochs"]
    OmegaConf.save(missing, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "a_file").write_text("not a directory\n")
    return tmp_path / "params.yaml"


def _assert_nothing_left(tmp_path: Path) -> None:
    """No MLflow run in the store (so none RUNNING), no training or evaluation output."""
    store = tmp_path / "mlflow.db"
    if store.exists():
        client = MlflowClient(tracking_uri=f"sqlite:///{store}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        assert [r.info.status for r in client.search_runs(experiments)] == []
    for output in ("models", "metrics", "reports"):
        assert not (tmp_path / output).exists(), output


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(("main", "args", "message"), _cases(STAGE_CASES))
def test_a_bad_stage_argument_costs_one_line(main, args, message, params_file, tmp_path, capsys):
    fill = {"tmp": tmp_path, "port": free_port()}
    args = [arg.format(**fill) for arg in args]
    if "--params" not in args:
        args = ["--params", str(params_file), *args]
    if main is prepare.main:
        # Bad input is caught before any work; were it not, nothing of the shared dataset is touched.
        args.append(f"paths.prepared_dir={tmp_path}/prepared")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert message.format(**fill) in line, line
    _assert_nothing_left(tmp_path)
    assert not (tmp_path / "prepared").exists()


# Real command lines. Hydra's own errors come before TensorFlow is imported: those cost a second each.
# fmt: off
CLI_CASES = [
    ("unknown Hydra override", ["trainer.epochz=3"], "Could not override 'trainer.epochz'"),
    ("unknown Hydra choice", ["model=resnet9"], "Could not find 'model/resnet9' Available options in"),
    ("unknown choice in a sweep", ["--multirun", "model=resnet8,plain9"], "Could not find 'model/plain9'"),
    ("Hydra output under a file", ["hydra.run.dir={tmp}/a_file/run"], "'{tmp}/a_file' is a file"),
    ("Hydra bad value", ["trainer.batch_size=0"], "trainer.batch_size must be a positive integer, got 0"),
    ("stage bad value", ["--params", "{tmp}/params.yaml", "trainer.epochs=-2"], "positive integer, got -2"),
]
# fmt: on


@pytest.mark.parametrize(("args", "message"), _cases(CLI_CASES))
def test_a_bad_command_line_costs_one_line(args, message, params_file, digits_root, tmp_path):
    args = [arg.format(tmp=tmp_path) for arg in args]
    if args[0] != "--params":
        # The case's overrides last: a later override of a key wins.
        flags = [arg for arg in args if arg.startswith("-")]
        base = [*TINY, *path_overrides(digits_root, tmp_path), f"hydra.run.dir={tmp_path}/run"]
        args = [
            *flags,
            *base,
            f"hydra.sweep.dir={tmp_path}/sweep",
            *(arg for arg in args if arg not in flags),
        ]
    result = run_cli(["resnet_lab.train", *args], tmp_path)
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and result.returncode == 2, result.stderr[-3000:]
    assert message.format(tmp=tmp_path) in lines[0], lines[0]
    _assert_nothing_left(tmp_path)
    assert not (tmp_path / "sweep").exists()
