"""Where configuration comes from: Hydra composition of `conf/`, or the `params.yaml` DVC composed from it.

Stage code reads `params.yaml` (DVC's Hydra integration writes it on `dvc exp run`; plain `dvc repro`
does not recompose), the Hydra app and the tests compose `conf/` directly.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resnet_lab.errors import ConfigError
from resnet_lab.schema import config_error, typed

PARAMS_FILE = "params.yaml"


def conf_dir() -> Path:
    """The `conf/` directory: `$RESNET_LAB_CONF`, else `./conf`, else the one beside the source tree."""
    if env := os.environ.get("RESNET_LAB_CONF"):
        return Path(env).resolve()
    here = Path.cwd() / "conf"
    if (here / "config.yaml").is_file():
        return here.resolve()
    return Path(__file__).resolve().parents[2] / "conf"


def compose(overrides: Sequence[str] = (), *, return_hydra_config: bool = False) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides, outside any Hydra app (tests, notebooks).

    Args:
        overrides: Hydra override strings, e.g. ``["model=plain34", "trainer.epochs=2"]``.
        return_hydra_config: keep Hydra's own `hydra` node (run and sweep directories, launcher).

    Returns:
        The composed configuration.

    Raises:
        ConfigError: an override Hydra cannot apply, or a value of the wrong type.
    """
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose("config", list(overrides), return_hydra_config=return_hydra_config)
    except HydraException as exc:
        raise config_error(exc) from None
    finally:
        GlobalHydra.instance().clear()


def load_params(path: str | os.PathLike = PARAMS_FILE) -> DictConfig:
    """Load the configuration DVC composed into `params.yaml`, typed by the schema `conf/` has.

    Raises:
        ConfigError: the file is missing, is not a mapping, lacks a key, or has a key the schema lacks or a
            value of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the repository root, or `dvc exp run` to compose it")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} must hold a mapping, got {type(cfg).__name__}")
    cfg = typed(cfg)
    if missing := sorted(OmegaConf.missing_keys(cfg)):
        raise ConfigError(f"{path} has no value for {', '.join(missing)}")
    return cfg


def stage_config(argv: Sequence[str] | None = None, *, description: str = "") -> DictConfig:
    """Parse a DVC stage's command line: ``[--params FILE] [dotted.key=value ...]``.

    Overrides use Hydra's grammar, as `dvc exp run -S` and the Hydra app do (lists and dicts included:
    ``'study.claims=[{key:degradation,subject:plain34,reference:plain18,hypothesis:greater}]'``), and may
    only replace keys that `params.yaml` has, so a typo fails instead of training the wrong thing.

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` when None.
        description: the stage's one-line help.

    Returns:
        `params.yaml` with the overrides applied.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=PARAMS_FILE, help="composed configuration (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.name=plain34 seed=1")
    args = parser.parse_args(argv)
    cfg = load_params(args.params)
    patch = OmegaConf.create()
    for item in args.overrides:
        try:
            (override,) = OverridesParser.create().parse_overrides([item])
        except HydraException as exc:
            raise ConfigError(f"override {item!r} is not KEY=VALUE: {str(exc).splitlines()[0]}") from None
        key = override.key_or_group
        if override.type is not OverrideType.CHANGE or override.is_sweep_override():
            raise ConfigError(f"override {item!r}: a stage takes KEY=VALUE only (no +, ~ or sweeps)")
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            raise ConfigError(f"override {item!r}: {args.params} has no key {key!r}")
        OmegaConf.update(patch, key, override.value(), merge=False)
    try:
        return OmegaConf.merge(cfg, patch)
    except OmegaConfBaseException as exc:
        raise config_error(exc) from None


_ABSENT = object()


def member_name(cfg: DictConfig) -> str:
    """A study member's name, `<model.name>-<seed>`: its DVC stages, directories and files are named so."""
    return f"{cfg.model.name}-{cfg.seed}"


def run_dir(cfg: DictConfig) -> Path:
    """Where a study member's training writes: `<paths.models_dir>/<model.name>-<seed>`."""
    return Path(cfg.paths.models_dir) / member_name(cfg)


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where a study member's training works and checkpoints: `<paths.checkpoints_dir>/<model.name>-<seed>`.

    Not a DVC output, which DVC would delete before it reran a killed stage.
    """
    return Path(cfg.paths.checkpoints_dir) / member_name(cfg)
