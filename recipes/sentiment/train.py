"""Training, evaluation and export: `train_and_evaluate(config, workdir)`."""

from __future__ import annotations

import time
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from lstm_tf import recipe
from recipes.sentiment import input_pipeline
from recipes.sentiment import model as models

CONFIG_RULES = {
    "vocab_size": (lambda v: isinstance(v, int) and v > 2, "an integer > 2"),
    "max_length": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "bucket_width": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "embedding_dim": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "lstm_units": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "num_layers": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "word_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lstm_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "batch_size": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "epochs": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "learning_rate": (lambda v: v > 0, "positive"),
    "clipnorm": (lambda v: v > 0, "positive"),
    "shuffle_buffer": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
}


def export(model: keras.Model, vectorizer: keras.layers.TextVectorization, config: Any,
           path: str) -> None:
    """SavedModel `serving_default`: `text` `[batch]` string → probability, label."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(vectorizer)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve(text: tf.Tensor) -> dict[str, tf.Tensor]:
        ids = input_pipeline.to_ids(vectorizer, text, config.max_length)
        probability = model(ids, training=False)[:, 0]
        return {"probability": probability,
                "label": tf.cast(probability >= 0.5, tf.int32)}

    archive.add_endpoint("serving_default", serve)
    archive.write_out(path, verbose=False)


def train_and_evaluate(config: Any, workdir: str,
                       strategy: tf.distribute.Strategy | None = None) -> dict[str, Any]:
    """Trains on config.train_split, keeps the best validation loss, tests, exports.

    Writes to `workdir`: config.json, vocab.txt, tensorboard/, backup/ (while
    training), checkpoints/, metrics.json and export/<version>/ (the chief
    only). Rerunning a killed run with the same workdir resumes it.
    `strategy` (default: the current one) replicates the model; the config's
    batch size is the global batch.

    Returns:
        The metrics written to metrics.json.
    """
    start = time.time()
    recipe.check_config(config, CONFIG_RULES)
    train_raw, val_raw, test_raw = input_pipeline.load_splits(config)
    strategy = strategy or tf.distribute.get_strategy()
    workdir = recipe.start_run(config, workdir, strategy)

    vectorizer = input_pipeline.make_vectorizer(config, train_raw, workdir / "vocab.txt")
    train_ds = input_pipeline.batches(train_raw, vectorizer, config, training=True)
    val_ds = input_pipeline.batches(val_raw, vectorizer, config, training=False)
    test_ds = input_pipeline.batches(test_raw, vectorizer, config, training=False)
    # A resumed run goes on with the shuffle order of its next epoch: tf.data draws
    # new shuffle seeds for each iterator, one iterator per epoch.
    for _ in range(recipe.completed_epochs(recipe.backup_dir(workdir, strategy))):
        iter(train_ds)

    with strategy.scope():
        model = models.create_model(config)
        model.compile(
            optimizer=keras.optimizers.Adam(config.learning_rate, clipnorm=config.clipnorm),
            loss="binary_crossentropy",
            metrics=["accuracy"])
    sample_ids, _ = next(iter(val_ds))
    logdir = workdir / "tensorboard"
    callbacks = recipe.training_callbacks(
        workdir, monitor="val_loss", mode="min", strategy=strategy,
        early_stopping_patience=config.early_stopping_patience) + [
        recipe.EpochSummaries(logdir / "metrics", config.to_dict()),
        recipe.GateHistograms(logdir / "gates", sample_ids[:32]),
    ]
    history = model.fit(train_ds, validation_data=val_ds, epochs=config.epochs,
                        callbacks=callbacks, verbose=recipe.progress_verbosity())
    train_seconds = time.time() - start

    model.load_weights(recipe.best_checkpoint(workdir))
    metrics = {
        "train": {k: float(v[-1]) for k, v in history.history.items()
                  if not k.startswith("val_")} if history.history else {},
        "validation": model.evaluate(val_ds, return_dict=True, verbose=0),
        "test": model.evaluate(test_ds, return_dict=True, verbose=0),
    }
    if recipe.is_chief(strategy):
        exported = recipe.export_saved_model(
            lambda path: export(model, vectorizer, config, path), workdir)
        metrics["export"] = str(exported)
    metrics["train_seconds"] = round(train_seconds, 1)
    metrics["wall_seconds"] = round(time.time() - start, 1)
    recipe.write_json(workdir / "metrics.json", metrics)
    logging.info("test accuracy %.4f; exported to %s", metrics["test"]["accuracy"],
                 metrics.get("export"))
    return metrics
