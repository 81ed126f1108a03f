"""Training, evaluation and export: `train_and_evaluate(config, workdir)`."""

from __future__ import annotations

import pathlib
import time
from typing import Any

import keras
import tensorflow as tf
from keras.optimizers.schedules import LearningRateSchedule

from recipes.common import checkpoints, distribute, errors, exports, summaries, workdirs
from recipes.sentiment import adversarial, explain, input_pipeline, pretrained, serving
from recipes.sentiment import model as models

CONFIG_RULES = {
    "split": (lambda v: v in input_pipeline.SPLITS, "'whitespace' or 'character'"),
    "ngrams": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "vocab_size": (lambda v: isinstance(v, int) and v > 2, "an integer > 2"),
    "max_length": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "bucket_width": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "model": (lambda v: v in ("bilstm", "ngrams", "bilstm_ngrams"),
              "'bilstm', 'ngrams' or 'bilstm_ngrams'"),
    "bag_ngrams": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "bag_buckets": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "embedding_dim": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "lstm_units": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "num_layers": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "word_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lstm_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "batch_size": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "epochs": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "learning_rate": (lambda v: v > 0, "positive"),
    "lr_schedule": (lambda v: v in ("constant", "cosine"), "'constant' or 'cosine'"),
    "clipnorm": (lambda v: v > 0, "positive"),
    "pretrained_lr_scale": (lambda v: v > 0, "positive"),
    "ngrams_lr_scale": (lambda v: v > 0, "positive"),
    "shuffle_buffer": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "fold_embedding": (lambda v: isinstance(v, bool), "True or False"),
    "normalize_embeddings": (lambda v: isinstance(v, bool), "True or False"),
    "adversarial_epsilon": (lambda v: v >= 0, ">= 0 (0: off)"),
    "virtual_adversarial_epsilon": (lambda v: v >= 0, ">= 0 (0: off)"),
    "adversarial_weight": (lambda v: v > 0, "positive"),
    "virtual_adversarial_weight": (lambda v: v > 0, "positive"),
    "virtual_adversarial_xi": (lambda v: v > 0, "positive"),
    "unlabeled_split": (lambda v: isinstance(v, str), "a split name ('': none)"),
    "dtype_policy": (lambda v: v in ("float32", "mixed_bfloat16"),
                     "'float32' or 'mixed_bfloat16'"),
}


def training_model(config: Any) -> keras.Model:
    """`models.create_model(config)` under the Keras dtype policy `config.dtype_policy`
    (its variables are float32 under any policy)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(config.dtype_policy)
    try:
        return models.create_model(config)
    finally:
        keras.config.set_dtype_policy(previous)


def float32_model(model: keras.Model, config: Any) -> keras.Model:
    """`model`, or under a mixed policy the float32 model of `config` with its weights (what
    is exported: serving, `explain` and the deployment formats compute in float32)."""
    if model.dtype_policy.name == "float32":
        return model
    exact = models.create_model(config)
    exact.set_weights(model.get_weights())
    return exact


def export(model: keras.Model, vectorizer: keras.layers.TextVectorization, config: Any,
           path: str) -> None:
    """SavedModel `serving_default`: `text` `[batch]` string → probability, label (through
    `serving.probability_function`, the model's maths rearranged for speed); and
    `explain` (`explain.explain_function`): the gates of the first Bi-LSTM layer (not for
    `config.model="ngrams"`, which has none)."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(vectorizer)
    probability_of = serving.probability_function(model, config)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve(text: tf.Tensor) -> dict[str, tf.Tensor]:
        probability = probability_of(input_pipeline.to_ids(vectorizer, text, config.max_length))
        return {"probability": probability,
                "label": tf.cast(probability >= 0.5, tf.int32)}

    archive.add_endpoint("serving_default", serve)
    if config.model != "ngrams":
        archive.add_endpoint("explain", explain.explain_function(model, vectorizer, config))
    archive.write_out(path, verbose=False)


def learning_rate(config: Any, steps_per_epoch: int) -> float | LearningRateSchedule:
    """`config.learning_rate`, or with `config.lr_schedule="cosine"` that rate decayed to 0
    over the run's `config.epochs * steps_per_epoch` steps (a resumed run restores the
    optimizer's step count, so its schedule goes on where it stopped)."""
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(config.learning_rate,
                                                      config.epochs * steps_per_epoch)
    return config.learning_rate


def compiled_trainer(model: keras.Model, config: Any, steps_per_epoch: int) -> keras.Model:
    """`model`, or a model on its layers that adds the adversarial losses
    (`adversarial.training_model`), compiled as the recipe trains it: its optimizer
    (`pretrained.optimizer`), and the loss and accuracy as means over a batch's rows of
    weight 1 (`input_pipeline.training_batches` fills batches up with rows of weight 0)."""
    trainer = adversarial.training_model(model, config)
    trainer.compile(
        optimizer=pretrained.optimizer(model, config, learning_rate(config, steps_per_epoch)),
        loss=keras.losses.BinaryCrossentropy(reduction="mean_with_sample_weight"),
        weighted_metrics=["accuracy"])
    return trainer


def train_and_evaluate(config: Any, workdir: str,
                       strategy: tf.distribute.Strategy | None = None) -> dict[str, Any]:
    """Trains on config.train_split, keeps the best validation loss, tests, exports.

    Writes to `workdir`: config.json, vocab.txt, tensorboard/, backup/ (while
    training), checkpoints/, metrics.json and export/<version>/ (the chief
    only). Rerunning a killed run with the same workdir resumes it; rerunning a finished
    one returns its metrics.json (see `workdirs.finished_metrics`).
    `strategy` (default: the current one) replicates the model; the config's
    batch size is the global batch.

    Returns:
        The metrics written to metrics.json.
    """
    start = time.time()
    errors.check_config(config, CONFIG_RULES)
    if config.init_from and config.model == "ngrams":
        raise errors.RecipeError("--config.init_from needs an LSTM: --config.model=bilstm or "
                                 "bilstm_ngrams (--config.model='ngrams' has none)")
    if config.model == "ngrams" and (adversarial.enabled(config)
                                     or config.normalize_embeddings):
        raise errors.RecipeError(
            "--config.adversarial_epsilon, --config.virtual_adversarial_epsilon and "
            "--config.normalize_embeddings need an embedding: --config.model=bilstm or "
            "bilstm_ngrams (--config.model='ngrams' has none)")
    if config.init_backward_from and not config.init_from:
        raise errors.RecipeError("--config.init_backward_from needs --config.init_from (the "
                                 "forward language model, whose words and embedding it shares)")
    if (finished := workdirs.finished_metrics(config, workdir)) is not None:
        return finished
    vocab = None
    if config.init_from and not (pathlib.Path(workdir).expanduser() / "vocab.txt").exists():
        # The language model's words (and a bad init_from is found before the workdir is made;
        # a backward model's direction and sizes too, its embedding when it is read: no Keras
        # model may be built here, or a resumed run's layer names would differ).
        vocab = pretrained.vocabulary(pretrained.language_model(config)[2], config.vocab_size)
        if config.init_backward_from:
            pretrained.language_model(config, backward=True)
    train_raw, val_raw, test_raw = input_pipeline.load_splits(config)
    unlabeled_raw = None
    if config.virtual_adversarial_epsilon > 0 and config.unlabeled_split:
        (unlabeled_raw,) = input_pipeline.load_texts(config, [config.unlabeled_split])
    strategy = strategy or tf.distribute.get_strategy()
    workdir = workdirs.start_run(config, workdir, strategy)

    vectorizer = input_pipeline.make_vectorizer(config, train_raw, workdir / "vocab.txt", vocab)
    # A resumed run goes on with the batches (and the weights) of its next epoch.
    first_epoch = checkpoints.completed_epochs(checkpoints.backup_dir(workdir, strategy))
    train_ds, steps_per_epoch = input_pipeline.training_batches(
        train_raw, vectorizer, config, first_epoch=first_epoch, unlabeled=unlabeled_raw)
    val_ds = input_pipeline.batches(val_raw, vectorizer, config)
    test_ds = input_pipeline.batches(test_raw, vectorizer, config)

    with strategy.scope():
        model = training_model(config)
        if not first_epoch:  # (a resumed run restores its own weights)
            if config.normalize_embeddings:
                models.embedding_layer(model).frequencies.assign(
                    input_pipeline.token_counts(train_raw, vectorizer, config))
            if config.init_from:
                pretrained.initialize(model, config, vectorizer.get_vocabulary()[2:])
        # `model`, or a model on its layers that adds the adversarial losses: trained,
        # checkpointed and evaluated; `model` alone is exported.
        trainer = compiled_trainer(model, config, steps_per_epoch)
    sample_texts, _ = next(iter(val_raw.batch(32)))
    logdir = workdir / "tensorboard"
    callbacks = checkpoints.training_callbacks(
        workdir, monitor="val_loss", mode="min", strategy=strategy,
        early_stopping_patience=config.early_stopping_patience) + [
        summaries.EpochSummaries(logdir / "metrics", config.to_dict()),
        summaries.StepSummaries(logdir / "metrics", config.log_every_steps),
        summaries.GateHistograms(logdir / "gates", input_pipeline.to_ids(
            vectorizer, sample_texts, config.max_length)),
    ]
    if config.model != "ngrams":
        callbacks.append(explain.ExplainImages(logdir / "explain", config.explain_texts,
                                               vectorizer, config))
    history = trainer.fit(train_ds, validation_data=val_ds, epochs=config.epochs,
                          initial_epoch=first_epoch, steps_per_epoch=steps_per_epoch,
                          shuffle=False, callbacks=callbacks,
                          verbose=summaries.progress_verbosity())
    train_seconds = time.time() - start

    trainer.load_weights(checkpoints.best_checkpoint(workdir))
    metrics = {
        "train": {k: float(v[-1]) for k, v in history.history.items()
                  if not k.startswith("val_")} if history.history else {},
        "validation": trainer.evaluate(val_ds, return_dict=True, verbose=0),
        "test": trainer.evaluate(test_ds, return_dict=True, verbose=0),
    }
    if distribute.is_chief(strategy):
        exported = exports.export_saved_model(
            lambda path: export(float32_model(model, config), vectorizer, config, path), workdir)
        metrics["export"] = str(exported)
    return workdirs.finish_run(workdir, metrics, start, train_seconds)
