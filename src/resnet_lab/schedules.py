"""Learning-rate schedules from the `schedule` config group, built on Keras's own schedule classes."""

from __future__ import annotations

import keras
from omegaconf import DictConfig


@keras.saving.register_keras_serializable(package="resnet_lab")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Ramp linearly from 0 to the wrapped schedule's value over `warmup_steps`, then follow it.

    Keras's CosineDecay has a warm-up of its own; this gives the step and constant schedules one.
    """

    def __init__(self, after_warmup, warmup_steps: int):
        self.after_warmup = after_warmup
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        rate = self.after_warmup(step)
        return keras.ops.where(step < self.warmup_steps, (step + 1.0) / float(self.warmup_steps) * rate, rate)

    def get_config(self):
        return {
            "after_warmup": keras.saving.serialize_keras_object(self.after_warmup),
            "warmup_steps": self.warmup_steps,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["after_warmup"] = keras.saving.deserialize_keras_object(config["after_warmup"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="resnet_lab")
class ConstantWarmup(LinearWarmup):
    """A constant `factor` x the wrapped schedule's value for `warmup_steps`, then follow it.

    He et al. 2015, Sec. 4.2 train ResNet-110 at 0.01 for about 400 iterations before 0.1.
    """

    def __init__(self, after_warmup, warmup_steps: int, factor: float):
        super().__init__(after_warmup, warmup_steps)
        self.factor = factor

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        rate = self.after_warmup(step)
        return keras.ops.where(step < self.warmup_steps, self.factor * rate, rate)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def make_schedule(schedule: DictConfig, learning_rate: float, steps_per_epoch: int, epochs: int):
    """A Keras learning-rate schedule over the run: `epochs` epochs of `steps_per_epoch` optimizer steps.

    Args:
        schedule: the `schedule` node, validated: `name` (step | cosine | constant) and the warm-up.
            step: multiply by `factor` at each of `milestones` (fractions of training; the paper divides
            by 10 at 50% and 75%, He et al. 2015, Sec. 4.2). cosine: decay to `alpha` x the initial rate.
        learning_rate: the peak rate, for the global batch.

    Returns:
        A `keras.optimizers.schedules.LearningRateSchedule`, or a float for an unwarmed constant rate.
    """
    total_steps = steps_per_epoch * epochs
    warmup_steps = int(round(schedule.warmup_epochs * steps_per_epoch))
    if schedule.name == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup_steps else learning_rate,
            decay_steps=max(total_steps - warmup_steps, 1),
            alpha=float(schedule.alpha),
            warmup_target=learning_rate if warmup_steps else None,
            warmup_steps=warmup_steps,
        )
    if schedule.name != "step" and not warmup_steps:
        return learning_rate
    # A warmed-up constant rate is a step schedule whose one step, at the end, changes nothing.
    milestones, factor = (schedule.milestones, schedule.factor) if schedule.name == "step" else ([1.0], 1.0)
    after = keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries=[int(m * total_steps) for m in milestones],
        values=[learning_rate * factor**i for i in range(len(milestones) + 1)],
    )
    if not warmup_steps:
        return after
    if schedule.warmup_factor is not None:
        return ConstantWarmup(after, warmup_steps, float(schedule.warmup_factor))
    return LinearWarmup(after, warmup_steps)
