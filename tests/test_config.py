"""The one configuration schema (`resnet_lab.schema`): every shipped option composes onto it and validates,
DVC's composition uses it, and a wrong type, an unknown choice or a value out of range costs one `error:`
line and exit status 2, through Hydra's command line and through the params.yaml a DVC stage reads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import TINY, path_overrides, run_cli
from resnet_lab.config import compose
from resnet_lab.schema import validate
from resnet_lab.train import stage_main

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = [
    f"{group.name}={option.stem}"
    for group in sorted((ROOT / "conf").iterdir())
    if group.is_dir() and group.name != "hydra"
    for option in sorted(group.glob("*.yaml"))
    if not option.stem.startswith("_")
]
# id, one bad value as a Hydra override (and, in params.yaml, as the file's value), what the line says.
BAD_VALUES = [
    ("wrong type", "trainer.epochs=abc", "trainer.epochs must be an integer, got 'abc'"),
    ("unknown choice", "trainer.precision=float8", "unknown trainer.precision 'float8'; choose one of"),
    ("out of range", "optimizer.momentum=1.5", "optimizer.momentum must be in [0, 1), got 1.5"),
]


@pytest.mark.parametrize("option", OPTIONS)
def test_every_shipped_option_composes_onto_the_schema_and_validates(option):
    cfg = compose([option])
    assert type(cfg.trainer.epochs) is int and type(cfg.optimizer.learning_rate) is float
    validate(cfg)


def test_the_slurm_launcher_composes_beside_the_schema():
    cfg = compose(["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.tasks_per_node == 1


def test_dvc_composes_on_the_schema_without_importing_resnet_lab(tmp_path):
    """`dvc exp run` composes in its own process: Hydra's plugin scan registers the schema there."""
    script = (
        "import sys\nfrom dvc.utils.hydra import compose_and_dump\n"
        "compose_and_dump(sys.argv[1], sys.argv[2], None, 'config', sys.argv[3], sys.argv[4:])\n"
        "assert 'resnet_lab.schema' in sys.modules and 'tensorflow' not in sys.modules\n"
    )

    def compose_with_dvc(*overrides):
        return run_cli(
            [sys.executable, "-c", script, tmp_path / "params.yaml", ROOT / "conf", ROOT, *overrides],
            tmp_path,
        )

    composed = compose_with_dvc()
    assert composed.returncode == 0, composed.stderr[-3000:]
    assert OmegaConf.load(tmp_path / "params.yaml") == OmegaConf.load(ROOT / "params.yaml")
    refused = compose_with_dvc("trainer.epochs=abc")
    assert refused.returncode != 0 and "could not be converted to Integer" in refused.stderr


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    return line


@pytest.mark.parametrize(("override", "message"), [pytest.param(*c[1:], id=c[0]) for c in BAD_VALUES])
def test_a_bad_value_on_hydras_command_line_costs_one_line(override, message, tmp_path):
    args = [*TINY, *path_overrides(tmp_path, tmp_path), f"hydra.run.dir={tmp_path}/run", override]
    result = run_cli(["resnet_lab.train", *args], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in _error_line(result.stderr)
    assert not (tmp_path / "models").exists() and not list((tmp_path / "run").glob("*.keras"))


@pytest.mark.parametrize(("override", "message"), [pytest.param(*c[1:], id=c[0]) for c in BAD_VALUES])
def test_a_bad_value_in_the_stages_params_yaml_costs_one_line(override, message, tmp_path, capsys):
    params = OmegaConf.create(OmegaConf.to_container(compose([*TINY, *path_overrides(tmp_path, tmp_path)])))
    key, value = override.split("=")
    OmegaConf.update(params, key, yaml.safe_load(value))
    OmegaConf.save(params, tmp_path / "params.yaml")
    with pytest.raises(SystemExit) as exit_info:
        stage_main(["--params", str(tmp_path / "params.yaml")])
    assert exit_info.value.code == 2
    assert message in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "models").exists() and not (tmp_path / "checkpoints").exists()


def test_a_stage_reads_overrides_in_hydras_grammar_as_dvc_exp_run_does(tmp_path):
    from resnet_lab.config import stage_config

    OmegaConf.save(compose([]), tmp_path / "params.yaml")
    claim = "{key:degradation,subject:plain56,reference:plain20,hypothesis:greater}"
    overrides = [f"study.claims=[{claim}]", "study.models=[plain20,plain56]"]
    overrides += ["tracking.uri=http://127.0.0.1:5000", "optimizer.learning_rate=2e-1"]
    cfg = stage_config(["--params", str(tmp_path / "params.yaml"), *overrides])
    assert OmegaConf.to_container(cfg.study.claims) == [
        {"key": "degradation", "subject": "plain56", "reference": "plain20", "hypothesis": "greater"}
    ]
    assert list(cfg.study.models) == ["plain20", "plain56"]
    assert cfg.tracking.uri == "http://127.0.0.1:5000" and cfg.optimizer.learning_rate == 0.2
