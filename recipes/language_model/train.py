"""Training, evaluation and export: `train_and_evaluate(config, workdir)`."""

from __future__ import annotations

import math
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from recipes.common import checkpoints, errors, exports, summaries, workdirs
from recipes.common import language_models as models
from recipes.language_model import input_pipeline, sampling

_positive_int = (lambda v: isinstance(v, int) and v > 0, "a positive integer")
CONFIG_RULES = {
    "level": (lambda v: v in ("char", "word"), "'char' or 'word'"),
    "standardize": (lambda v: v in ("", "sentiment"), "'' or 'sentiment' (word level)"),
    "vocab_size": (lambda v: isinstance(v, int) and (v == 0 or v > 1), "0 (all) or an integer > 1"),
    "embedding_dim": _positive_int,
    "units": _positive_int,
    "num_layers": _positive_int,
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "init_scale": (lambda v: v > 0, "positive"),
    "batch_size": _positive_int,
    "num_steps": _positive_int,
    "epochs": _positive_int,
    "optimizer": (lambda v: v in ("sgd", "adam"), "'sgd' or 'adam'"),
    "learning_rate": (lambda v: v > 0, "positive"),
    "lr_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "decay_after": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "clipnorm": (lambda v: v > 0, "positive"),
    "score_chunk": _positive_int,
    "eval_rows": _positive_int,
    "sample_tokens": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
}


def sequence_loss(targets: Any, logits: Any) -> Any:
    """Cross-entropy summed over the time steps, per sequence (Zaremba et al.'s loss)."""
    return keras.ops.sum(keras.losses.sparse_categorical_crossentropy(
        targets, logits, from_logits=True), axis=-1)


def token_metrics(cross_entropy: float, level: str) -> dict[str, float]:
    """Per-token cross-entropy (nats) and its perplexity or bits per character."""
    if level == "char":
        return {"cross_entropy": cross_entropy, "bits_per_char": cross_entropy / math.log(2)}
    return {"cross_entropy": cross_entropy, "perplexity": math.exp(cross_entropy)}


def split_lines(text: str, rows: int) -> list[str]:
    """`text` cut at line ends into at most `rows` contiguous pieces of similar length."""
    lines = text.splitlines(keepends=True)
    pieces, size = [[]], len(text) / rows
    for line in lines:
        if len(pieces) < rows and sum(map(len, pieces[-1])) >= size:
            pieces.append([])
        pieces[-1].append(line)
    return ["".join(piece) for piece in pieces]


def evaluate(functions: sampling.LanguageModelFunctions, text: str, level: str,
             rows: int = 1) -> dict[str, float]:
    """The metrics of a whole split: every token scored once.

    `rows=1` scores the split as one stream from the start state (the reported
    numbers); more rows cut it at line ends into pieces scored side by side,
    each from the start state (faster; used for the per-epoch validation).
    """
    scored = functions.score(tf.constant(split_lines(text, rows) if rows > 1 else [text]))
    tokens = int(tf.reduce_sum(scored["num_tokens"]))
    nats = -float(tf.reduce_sum(scored["total_log_prob"])) / tokens
    return {**token_metrics(nats, level), "tokens": tokens}


class ResetStates(keras.callbacks.Callback):
    """Each epoch starts from the zero state (the stream starts over)."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        models.reset_states(self.model)


class StreamEvaluation(keras.callbacks.Callback):
    """Each epoch: the validation split's metrics into `logs` (as `val_*`), and a sample.

    Copies the training model's weights into the step model behind
    `functions`, scores the whole validation split (in `config.eval_rows`
    pieces) and writes a generated text to TensorBoard (`tf.summary.text`).
    Put it before the callbacks that read `val_*` (checkpoints, summaries).
    """

    def __init__(self, functions: sampling.LanguageModelFunctions, text: str, config: Any,
                 logdir: str) -> None:
        super().__init__()
        self.functions, self.text, self.config = functions, text, config
        self.writer = tf.summary.create_file_writer(logdir)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.functions.model.set_weights(self.model.get_weights())
        metrics = evaluate(self.functions, self.text, self.config.level,
                           rows=self.config.eval_rows)
        metrics.pop("tokens")
        logs.update({f"val_{k}": v for k, v in metrics.items()})
        logging.info("epoch %d: validation %s", epoch + 1,
                     ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.config.sample_tokens:
            sample = self.functions.generate(
                tf.constant([self.config.sample_prompt]), self.config.sample_tokens,
                self.config.sample_temperature, 0)["text"][0]
            with self.writer.as_default():
                # Markdown: keep the line breaks of the sample.
                shown = tf.strings.regex_replace(self.config.sample_prompt + sample, "\n", "  \n")
                tf.summary.text("samples", shown, step=epoch + 1)
            self.writer.flush()


def learning_rate_schedule(config: Any) -> keras.callbacks.Callback:
    """lr = learning_rate * lr_decay ** max(epoch - decay_after, 0), epochs from 1."""
    return keras.callbacks.LearningRateScheduler(
        lambda epoch, lr: config.learning_rate * config.lr_decay ** max(
            epoch + 1 - config.decay_after, 0))


def fixed_embedding(config: Any) -> tuple[list[str], np.ndarray]:
    """The vocabulary and embedding matrix of the language model in `config.embedding_from`.

    `RecipeError` if it is missing or tokenizes, or embeds, differently from `config`.
    """
    try:
        path, source, vocab = models.finished_run(config.embedding_from)
    except errors.RecipeError as e:
        raise errors.RecipeError(f"--config.embedding_from={config.embedding_from}: {e}") from None
    for key in ("level", "standardize", "vocab_size", "unknown_token", "embedding_dim"):
        if source.get(key, "") != config[key]:
            raise errors.RecipeError(
                f"--config.{key}={config[key]!r}, but the language model in {path} (which "
                f"--config.embedding_from names) has {key}={source.get(key, '')!r}")
    model = models.trained_step_model(source, vocab, path)
    return vocab, model.get_layer("embedding").get_weights()[0]


def export(functions: sampling.LanguageModelFunctions, path: str) -> None:
    """SavedModel with the `generate` and `score` signatures (see `sampling`)."""
    tf.saved_model.save(functions, path, signatures={
        "generate": functions.generate, "score": functions.score})


def train_and_evaluate(config: Any, workdir: str,
                       strategy: tf.distribute.Strategy | None = None) -> dict[str, Any]:
    """Trains with truncated BPTT, keeps the best validation loss, tests (if the config
    has a test split), exports.

    With `config.embedding_from`, the vocabulary and the embedding are that language
    model's, and the embedding is not trained.

    Writes to `workdir`: config.json, vocab.json, tensorboard/, backup/ (while
    training), checkpoints/, metrics.json and export/<version>/. Rerunning a
    killed run with the same workdir resumes it (from its last finished epoch); rerunning a
    finished one returns its metrics.json (see `workdirs.finished_metrics`).
    `strategy` (default: the current one) must have one replica: the stateful
    TBPTT layers carry one state per row of the global batch.

    Returns:
        The metrics written to metrics.json.
    """
    start = time.time()
    errors.check_config(config, CONFIG_RULES)
    strategy = strategy or tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync > 1:
        raise errors.RecipeError(
            f"the language model trains with stateful TBPTT, which needs one replica "
            f"(this strategy has {strategy.num_replicas_in_sync}); use --strategy=default or "
            "a single device")
    if (finished := workdirs.finished_metrics(config, workdir)) is not None:
        return finished
    # (checked before the workdir is made; built on every start, so layer names stay the same)
    given, embedding = fixed_embedding(config) if config.embedding_from else (None, None)
    train_text, val_text, test_text = input_pipeline.read_splits(config)
    workdir = workdirs.start_run(config, workdir, strategy)

    vocab = input_pipeline.build_vocabulary(config, train_text, workdir / "vocab.json", given)
    lookup = input_pipeline.make_lookup(config, vocab)
    train_ds = input_pipeline.tbptt_batches(
        input_pipeline.to_stream(train_text, lookup, config),
        config.batch_size, config.num_steps)
    logging.info("vocabulary %d tokens; %d training batches of %d x %d per epoch",
                 len(vocab) + 1, train_ds.cardinality(), config.batch_size, config.num_steps)

    with strategy.scope():
        model = models.create_model(config, len(vocab) + 1, batch_size=config.batch_size)
        if embedding is not None:
            model.get_layer("embedding").set_weights([embedding])
            model.get_layer("embedding").trainable = False
        optimizer = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}[
            config.optimizer]
        model.compile(
            optimizer=optimizer(config.learning_rate, global_clipnorm=config.clipnorm),
            loss=sequence_loss,
            metrics=[keras.metrics.SparseCategoricalCrossentropy(
                from_logits=True, name="cross_entropy")])
    functions = sampling.LanguageModelFunctions(
        models.create_model(config, len(vocab) + 1), lookup,
        input_pipeline.make_lookup(config, vocab, invert=True), config)
    logdir = workdir / "tensorboard"
    callbacks = [
        ResetStates(),
        learning_rate_schedule(config),
        StreamEvaluation(functions, val_text, config, str(logdir / "samples")),
        *checkpoints.training_callbacks(workdir, monitor="val_cross_entropy", mode="min",
                                   strategy=strategy),
        summaries.EpochSummaries(logdir / "metrics", config.to_dict()),
        summaries.StepSummaries(logdir / "metrics", config.log_every_steps),
    ]
    # A resumed run goes on with the epoch after its backup's (the stream starts over each epoch).
    first_epoch = checkpoints.completed_epochs(checkpoints.backup_dir(workdir, strategy))
    history = model.fit(train_ds, epochs=config.epochs, initial_epoch=first_epoch,
                        callbacks=callbacks, shuffle=False,
                        verbose=summaries.progress_verbosity())
    train_seconds = time.time() - start

    model.load_weights(checkpoints.best_checkpoint(workdir))
    functions.model.set_weights(model.get_weights())
    metrics = {
        "train": {k: float(v[-1]) for k, v in history.history.items()},
        "validation": evaluate(functions, val_text, config.level),
        "vocab_size": len(vocab) + 1,
    }
    if test_text is not None:  # (a config may have no test split: `imdb`)
        metrics["test"] = evaluate(functions, test_text, config.level)
    exported = exports.export_saved_model(lambda path: export(functions, path), workdir)
    metrics["export"] = str(exported)
    return workdirs.finish_run(workdir, metrics, start, train_seconds)
