"""The sentiment recipe's training step, three ways (`lstm_throughput.py --main_job`).

The batches are the recipe's own (`recipes.sentiment.input_pipeline`, default config); the
models are its Bi-LSTM classifier built from lstm_tf (`recipes.sentiment.model`; also on the
XLA loops instead of the CPU kernel, on the step loop, and under the `mixed_bfloat16` policy),
the same model of keras.layers, and of torch.nn, each trained as the recipe trains it (Adam,
gradients clipped to norm 1 each, binary cross-entropy).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Callable

import keras
import numpy as np

import lstm_tf
from configs import sentiment as sentiment_config
from recipes.sentiment import input_pipeline
from recipes.sentiment import model as models

NAMES = ["lstm_tf", "lstm_tf XLA loops", "lstm_tf fused=False", "lstm_tf mixed_bfloat16", "keras",
         "torch"]
CONFIG = sentiment_config.get_config()


def recipe_batches(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first `count` training batches of the recipe's first epoch."""
    train, _, _ = input_pipeline.load_splits(CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        vectorizer = input_pipeline.make_vectorizer(CONFIG, train, pathlib.Path(tmp) / "vocab")
    batches, _ = input_pipeline.training_batches(train, vectorizer, CONFIG)
    # (The first batches are full ones: their weights are all 1.)
    return [(ids.numpy(), labels.numpy()) for ids, labels, _ in batches.take(count)]


def contender(name: str) -> Callable[[np.ndarray, np.ndarray], object]:
    """One training step `step(ids, labels)` of contender `name`."""
    if name == "torch":
        return _torch_step()
    if name == "keras":
        model = _keras_model()
    elif name == "lstm_tf mixed_bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            model = models.create_model(CONFIG)
        finally:
            keras.mixed_precision.set_global_policy("float32")
    else:
        model = models.create_model(CONFIG)
        if name == "lstm_tf fused=False":
            for layer in model.layers:
                if isinstance(layer, lstm_tf.Bidirectional):
                    layer.forward_layer.fused = layer.backward_layer.fused = False
    model.compile(optimizer=keras.optimizers.Adam(CONFIG.learning_rate, clipnorm=CONFIG.clipnorm),
                  loss="binary_crossentropy", metrics=["accuracy"])
    if name != "lstm_tf XLA loops":
        return model.train_on_batch

    def without_kernel(ids: np.ndarray, labels: np.ndarray) -> object:
        # (The loops are chosen when the step is traced, on its first call.)
        os.environ["LSTM_TF_KERNEL"] = "0"
        try:
            return model.train_on_batch(ids, labels)
        finally:
            del os.environ["LSTM_TF_KERNEL"]

    return without_kernel


def _keras_model() -> keras.Model:
    """`recipes.sentiment.model.create_model` with keras.layers' LSTM and Bidirectional."""
    c = CONFIG
    tokens = keras.Input((None,), dtype="int64")
    x = keras.layers.Embedding(c.vocab_size, c.embedding_dim, mask_zero=True)(tokens)
    x = keras.layers.Dropout(c.word_dropout, noise_shape=(None, None, 1))(x)
    x = keras.layers.Dropout(c.dropout)(x)
    x = keras.layers.Bidirectional(keras.layers.LSTM(c.lstm_units, return_sequences=True))(x)
    x = models.MaskedMeanMaxPooling()(x)
    x = keras.layers.Dropout(c.dropout)(x)
    return keras.Model(tokens, keras.layers.Dense(1, activation="sigmoid")(x))


def _torch_step() -> Callable[[np.ndarray, np.ndarray], object]:
    import torch

    c = CONFIG

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(c.vocab_size, c.embedding_dim, padding_idx=0)
            self.lstm = torch.nn.LSTM(c.embedding_dim, c.lstm_units, batch_first=True,
                                      bidirectional=True)
            self.head = torch.nn.Linear(4 * c.lstm_units, 1)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            mask = (ids > 0).unsqueeze(-1)
            x = self.embedding(ids)
            keep = torch.rand(x.shape[:2] + (1,)) >= c.word_dropout  # whole tokens
            x = torch.nn.functional.dropout(x * keep / (1 - c.word_dropout), c.dropout)
            h, _ = self.lstm(x)  # padded, not packed: as the recipe's batches come
            weights = mask.to(h.dtype)
            mean = (h * weights).sum(1) / weights.sum(1).clamp(min=1)
            peak = torch.where(mask, h, torch.full_like(h, -1e9)).amax(1)
            pooled = torch.nn.functional.dropout(torch.cat([mean, peak], -1), c.dropout)
            return self.head(pooled).squeeze(-1)

    model = Model()
    optimizer = torch.optim.Adam(model.parameters(), lr=c.learning_rate)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(ids: np.ndarray, labels: np.ndarray) -> float:
        optimizer.zero_grad()
        loss = loss_fn(model(torch.from_numpy(ids)), torch.from_numpy(labels).float())
        loss.backward()
        for p in model.parameters():  # Keras's clipnorm: each gradient by its own norm
            torch.nn.utils.clip_grad_norm_([p], c.clipnorm)
        optimizer.step()
        return loss.item()

    return step

