"""The configuration's one schema: dataclasses in Hydra's ConfigStore, each field with its choices or range.

The nodes are the schema of `conf/`'s YAML files (and, through `typed`, of params.yaml): a wrong type or an
unknown key fails where the configuration is composed or loaded; `validate` checks choices and ranges. No
field has a default: the values live in `conf/` alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from functools import partial
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode

from resnet_lab.errors import ConfigError
from resnet_lab.runtime import DISTRIBUTIONS, PRECISIONS


def _check(requirement: str, holds: Callable[[Any], bool]) -> Any:
    """A field that `validate` checks: unless `holds(value)`, "<key> must be <requirement>"; null passes."""
    return field(metadata={"requirement": requirement, "holds": holds})


def _one_of(*choices: Any) -> Any:
    return field(metadata={"choices": choices})


_positive = partial(_check, "a positive integer", lambda v: v >= 1)
_positive_or_null = partial(_check, "a positive integer or null", lambda v: v >= 1)
_below_one = partial(_check, "in [0, 1)", lambda v: 0 <= v < 1)
_seed = partial(_check, "an integer in [0, 2**32)", lambda v: 0 <= v < 2**32)


@dataclass
class Data:
    name: str  # one TFDS knows: resnet_lab.data.check_dataset_name
    image_size: int = _positive()
    validation_fraction: float = _check("a number in (0, 1)", lambda v: 0 < v < 1)
    split_seed: int = _seed()
    horizontal_flip: bool
    pad_crop: int = _check("a non-negative integer", lambda v: v >= 0)
    manual_dir: str | None
    cache: bool


STEMS = ("cifar", "imagenet")  # resnet_lab.models: Sec. 4.2's 3x3 stem, or Table 1's 7x7/2 and max-pool
SHORTCUTS = ("A", "B")  # Sec. 3.3: zero-padding identity, or 1x1 projection where the shape changes


@dataclass
class Model:
    name: str  # a key of resnet_lab.models.ARCHS
    stem: str = _one_of(*STEMS)
    width: int | None = _positive_or_null()
    shortcut: str = _one_of(*SHORTCUTS)
    zero_init_residual: bool
    bn_momentum: float = _below_one()


@dataclass
class Optimizer:
    name: str  # a key of OPTIMIZERS
    learning_rate: float = _check("positive", lambda v: v > 0)
    reference_batch_size: int | None = _positive_or_null()
    weight_decay: float = _check(">= 0", lambda v: v >= 0)


@dataclass
class Sgd(Optimizer):
    momentum: float = _below_one()
    nesterov: bool


@dataclass
class Adam(Optimizer):
    beta_1: float
    beta_2: float


@dataclass
class Schedule:  # the constant schedule, and the warm-up every schedule has
    name: str  # a key of SCHEDULES
    warmup_epochs: float  # in [0, trainer.epochs)
    warmup_factor: float | None = _check("in (0, 1] or null", lambda v: 0 < v <= 1)


@dataclass
class StepSchedule(Schedule):
    milestones: list[float] = _check(
        "increasing fractions in (0, 1)", lambda m: all(0 < v < 1 for v in m) and list(m) == sorted(m)
    )
    factor: float = _check("in (0, 1]", lambda v: 0 < v <= 1)


@dataclass
class CosineSchedule(Schedule):
    alpha: float


@dataclass
class Trainer:
    epochs: int = _positive()
    batch_size: int = _positive()
    steps_per_epoch: int | None = _positive_or_null()
    validation_steps: int | None = _positive_or_null()
    precision: str = _one_of(*PRECISIONS, "auto")
    jit_compile: Any = _one_of(True, False, "auto")  # OmegaConf 2.3 has no unions
    distribution: str = _one_of(*DISTRIBUTIONS)
    logical_cpus: int | None = _positive_or_null()
    deterministic: bool
    label_smoothing: float = _below_one()
    checkpoint: bool
    grad_norm_every: int = _check("an integer >= 0", lambda v: v >= 0)


@dataclass
class Tracking:
    enabled: bool
    uri: str | None
    experiment_name: str
    log_model: bool
    system_metrics_interval_s: float | None
    register: bool


@dataclass
class Convergence:
    window: int
    max_decrease: float
    threshold: float


@dataclass
class Study:  # its design is checked where it is compared: resnet_lab.report.check_design
    models: list[str]
    seeds: list[int]
    alpha: float
    margin: float
    test: str = _one_of("welch", "rank")  # resnet_lab.report.TESTS
    convergence: Convergence
    claims: list[dict[str, str]]  # key, subject, reference, hypothesis


@dataclass
class Config:
    seed: int = _seed()
    tags: list[str]
    paths: dict[str, str]  # data_dir, models_dir, ...: conf/paths/default.yaml
    data: Data
    model: Model
    optimizer: Any  # the node of the group's option: OPTIMIZERS[optimizer.name]
    schedule: Any
    trainer: Trainer
    tracking: Tracking
    study: Study


OPTIMIZERS = {"sgd": Sgd, "adam": Adam}
SCHEDULES = {"step": StepSchedule, "cosine": CosineSchedule, "constant": Schedule}

_store = ConfigStore.instance()
_store.store(name="schema", node=Config)
for _group, _options in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
    for _name, _node in _options.items():
        _store.store(group=_group, name=f"{_name}_schema", node=_node)


def typed(cfg: DictConfig) -> DictConfig:
    """`cfg` (params.yaml as loaded) merged onto the schema, the optimizer's and schedule's by their name."""
    schema = OmegaConf.structured(Config)
    for group, options in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        if (node := options.get(str(OmegaConf.select(cfg, f"{group}.name")))) is not None:
            schema[group] = node
    try:
        return OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as exc:
        raise config_error(exc) from None


_KINDS = {IntegerNode: "an integer", FloatNode: "a number", BooleanNode: "true or false"}


def config_error(exc: Exception) -> ConfigError:
    """Hydra's or OmegaConf's error in composing or merging, as one line that names the key and the value."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    if isinstance(cause, ValidationError) and type(node := cause.child_node) in _KINDS:
        null = " or null" if node._is_optional() else ""
        return ConfigError(f"{cause.full_key} must be {_KINDS[type(node)]}{null}, got {cause.value!r}")
    if isinstance(cause, ValidationError):
        return ConfigError(f"{cause.full_key}: {cause.msg.splitlines()[0]}")  # without OmegaConf's details
    # Hydra appends where it looked for configs: noise for a typo.
    return ConfigError(" ".join(str(exc).split()).split(" Config search path:")[0])


def validate(cfg: DictConfig) -> None:
    """Reject a configuration that cannot work, before any work, with one line naming the bad value.

    Raises:
        ConfigError: an unknown model, dataset or choice, a value out of its range, or of the wrong type.
    """
    from resnet_lab.data import check_dataset_name
    from resnet_lab.models import get_arch

    if OmegaConf.get_type(cfg) is not Config:  # one made by hand, not composed or loaded
        cfg = typed(cfg)
    get_arch(cfg.model.name)
    check_dataset_name(cfg.data.name)
    for group, options in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        if (name := cfg[group].name) not in options:
            raise ConfigError(f"unknown {group}.name {name!r}; choose one of {list(options)}")
    _check_fields(cfg, "")
    if not 0 <= cfg.schedule.warmup_epochs < cfg.trainer.epochs:
        raise ConfigError(
            f"schedule.warmup_epochs must be in [0, trainer.epochs={cfg.trainer.epochs}), "
            f"got {cfg.schedule.warmup_epochs!r}"
        )
    if cfg.schedule.name == "cosine" and cfg.schedule.warmup_factor is not None:
        raise ConfigError("schedule.warmup_factor: the cosine schedule warms up linearly; leave it null")


def _check_fields(node: DictConfig, prefix: str) -> None:
    for spec in fields(OmegaConf.get_type(node)):
        key, value, rule = f"{prefix}{spec.name}", node[spec.name], spec.metadata
        if isinstance(value, DictConfig) and is_dataclass(OmegaConf.get_type(value)):
            _check_fields(value, f"{key}.")
        elif "choices" in rule and value not in rule["choices"]:
            raise ConfigError(f"unknown {key} {value!r}; choose one of {list(rule['choices'])}")
        elif "holds" in rule and value is not None and not rule["holds"](value):
            raise ConfigError(f"{key} must be {rule['requirement']}, got {value!r}")
