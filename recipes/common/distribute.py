"""The `tf.distribute` strategy of a run, and what depends on it."""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf

from recipes.common.errors import RecipeError

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def make_strategy(name: str, cpu_devices: int = 0, tpu: str = "") -> tf.distribute.Strategy:
    """The `tf.distribute` strategy called `name` (one of `STRATEGIES`).

    Call it before any other TensorFlow work (MultiWorkerMirroredStrategy and
    logical devices must be set up first).
    """
    if cpu_devices < 0:
        raise RecipeError(f"--cpu_devices={cpu_devices} is invalid: it must be >= 0")
    if cpu_devices > 1:
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise RecipeError("--strategy=multi_worker needs the cluster in TF_CONFIG "
                              "(docs/distributed.md)")
        return _MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise RecipeError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})")


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`MultiWorkerMirroredStrategy` with a `reduce` that Keras 3's `fit` can use.

    Keras 3.15 calls it (1) on its whole first batch, a nest, to build the
    model, which this strategy rejects ("Attempt to convert a value
    (PerReplica..."; keras-team/keras#20585), and (2) with `axis=0` on the
    scalar loss and metrics of each step ("Invalid reduction dimension 0").
    Here each tensor is reduced alone, and scalars across replicas only.
    """

    def reduce(self, reduce_op: Any, value: Any, axis: Any) -> Any:
        parent = super()

        def reduce_one(v: Any) -> Any:
            rank = self.experimental_local_results(v)[0].shape.rank
            return parent.reduce(reduce_op, v, axis=None if rank == 0 else axis)

        return tf.nest.map_structure(reduce_one, value)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files (summaries, metrics, export)."""
    return strategy.extended.should_checkpoint


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with `AutoShardPolicy.DATA` for multi-worker runs.

    Every worker reads all the data and keeps its share of each global batch,
    so N workers train on the same batches as one process (file-based
    sharding would give each worker other files, and other batch counts).
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
