"""Registers resnet_lab's configuration schema in Hydra's ConfigStore wherever Hydra composes `conf/`.

Hydra imports every module under `hydra_plugins` before it composes (hydra-submitit-launcher registers
`submitit_slurm` so), which is how the schema reaches a process that never imports resnet_lab itself:
`dvc exp run`, through DVC's Hydra integration.
"""

import resnet_lab.schema  # noqa: F401
