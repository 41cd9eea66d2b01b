"""Runtime choices for a training run: the tf.distribute strategy, precision, XLA, and which process is chief.

Written so that the GPU paths run on a CPU too: logical CPU devices (`trainer.logical_cpus`) stand in for
several GPUs under MirroredStrategy, and a TF_CONFIG cluster of local processes for several machines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from omegaconf import DictConfig

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# Tensor Cores, which make float16 matmuls and convolutions fast, arrived with compute capability 7.0 (Volta).
TENSOR_CORE_CAPABILITY = (7, 0)
DISTRIBUTIONS = ("auto", "one_device", "mirrored", "multi_worker")


def make_strategy(cfg: DictConfig):
    """The tf.distribute strategy for `trainer.distribution` and the hardware.

    auto: MultiWorkerMirroredStrategy when TF_CONFIG is set, MirroredStrategy over several GPUs (or
    several logical CPUs, `trainer.logical_cpus`), else the default one-device strategy.
    """
    import tensorflow as tf

    logical_cpus = cfg.trainer.get("logical_cpus") or 1
    if logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        if tf.config.get_logical_device_configuration(cpu) is None:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(logical_cpus)]
            )
    choice = cfg.trainer.distribution
    if choice == "auto" and os.environ.get("TF_CONFIG"):
        choice = "multi_worker"
    elif choice == "auto" and (logical_cpus > 1 or len(tf.config.list_logical_devices("GPU")) > 1):
        choice = "mirrored"
    if choice == "multi_worker":
        _let_keras_fit_on_several_workers()
        return tf.distribute.MultiWorkerMirroredStrategy()
    if choice == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.get_strategy()


def resolve_jit_compile(setting, replicas: int) -> bool:
    """`trainer.jit_compile`: true, false, or auto = XLA on a single GPU only.

    Measured with `python -m resnet_lab.bench` on a 2-core CPU, XLA trains 2.3-3.8x slower than TensorFlow's
    own (oneDNN) kernels, and under MirroredStrategy over CPU devices it fails to place resources
    (keras-team/keras#19005); on a GPU it is the fast path.
    """
    import tensorflow as tf

    if setting == "auto":
        return replicas == 1 and bool(tf.config.list_logical_devices("GPU"))
    return bool(setting)


def resolve_precision(setting: str, gpu_capabilities: Sequence[tuple[int, int] | None] | None = None) -> str:
    """`trainer.precision`: a Keras dtype policy, or auto = mixed_float16 where every GPU has Tensor Cores.

    Auto follows Keras's mixed-precision guide (float16 compute, dynamic loss scaling from `model.compile`);
    without Tensor Cores, float32: a CPU emulates float16, and bfloat16 pays only with AVX512_BF16 or AMX.

    Args:
        setting: "float32", "mixed_float16", "mixed_bfloat16" or "auto".
        gpu_capabilities: (major, minor) per GPU, None for one that does not say; None: ask TensorFlow.

    Returns:
        The Keras dtype policy to train under.
    """
    if setting != "auto":
        return setting
    if gpu_capabilities is None:
        import tensorflow as tf

        gpu_capabilities = [
            tf.config.experimental.get_device_details(gpu).get("compute_capability")
            for gpu in tf.config.list_physical_devices("GPU")
        ]
    tensor_cores = [c is not None and tuple(c) >= TENSOR_CORE_CAPABILITY for c in gpu_capabilities]
    return "mixed_float16" if tensor_cores and all(tensor_cores) else "float32"


def worker_task() -> tuple[str, int] | None:
    """This process's task in a `TF_CONFIG` cluster, as (type, index); None outside one."""
    if not os.environ.get("TF_CONFIG"):
        return None
    task = json.loads(os.environ["TF_CONFIG"]).get("task", {})
    return str(task.get("type", "worker")), int(task.get("index", 0))


def is_chief() -> bool:
    """Whether this process records the run: always outside a cluster; in one, TF's chief.

    That is the `chief` task, else worker 0 (as TF's `multi_worker_util.is_chief` decides).
    """
    task = worker_task()
    if task is None:
        return True
    cluster = json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
    return task[0] == "chief" or (task == ("worker", 0) and "chief" not in cluster)


def _let_keras_fit_on_several_workers() -> None:
    """Work around Keras 3's TF trainer under MultiWorkerMirroredStrategy (keras-team/keras#20585).

    `fit` MEAN-reduces a whole distributed batch across workers only to learn its shapes, and reduces
    each scalar log along an axis 0 it does not have: both fail. One worker's local batch has the shapes;
    the logs are reduced as scalars. Remove once Keras handles the strategy itself.
    """
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    if getattr(tf_trainer, "_resnet_lab_multi_worker", False):
        return

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tree.map_structure(
                    lambda v: self.distribute_strategy.experimental_local_results(v)[0], next(batches)
                )
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    reduce_per_replica = tf_trainer.reduce_per_replica

    def reduce_scalars_across_workers(values, strategy, reduction):
        if tf_trainer._collective_all_reduce_multi_worker(strategy) and reduction in ("auto", "mean"):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return reduce_per_replica(values, strategy, reduction)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_scalars_across_workers
    tf_trainer._resnet_lab_multi_worker = True
