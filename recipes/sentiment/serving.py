"""The export's inference: `model(ids)` rearranged for fast serving on a CPU.

`probability_function(model, config)` computes what the trained model computes from
token ids, P(positive), to float rounding, with the Bi-LSTM run the fast way:

* the embedding is folded into each direction's input projection: a table of
  E·W + b, one row per vocabulary entry (each direction's: vocabulary × 4·units
  floats, in the SavedModel beside the model's own weights), so x_t·W + b is a lookup
  (`config.fold_embedding=False`: computed per request instead, a smaller export);
* each direction is one XLA-compiled loop that also pools (`lstm_tf.fused.
  pooled_inference`): the mean and max of h_t over the real steps accumulate in the
  loop, and no per-step output is written; the two directions run at the same time,
  the backward one reading each text reversed.

It applies to `config.model` `"bilstm"` and `"bilstm_ngrams"` with one Bi-LSTM layer
(the default), to right-padded ids (the tokenizer's: padding only after a text's
tokens); anything else is served by the model itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from lstm_tf import fused
from recipes.sentiment import model as models


def probability_function(model: keras.Model, config: Any) -> Callable[[tf.Tensor], tf.Tensor]:
    """`probability(ids)`: int64 `[batch, time]` token ids (0 = padding) → float32 `[batch]`
    P(positive), equal to `model(ids)[:, 0]` to float rounding.

    The folded tables are a snapshot of the model's weights: build this after training.
    """
    def by_model(ids: tf.Tensor) -> tf.Tensor:
        return model(ids, training=False)[:, 0]

    if config.model == "ngrams" or config.num_layers != 1:
        return by_model
    embedding, bidirectional = models.first_layers(model)
    directions = (bidirectional.forward_layer, bidirectional.backward_layer)
    if not all(layer.uses_fused_path(training=False) for layer in directions):
        return by_model
    if config.fold_embedding:  # x_t·W + b of every vocabulary entry, per direction
        tables = [tf.Variable(tf.matmul(embedding.embeddings, layer.cell.kernel)
                              + layer.cell.bias, trainable=False,
                              name=f"{layer.name}_input_projections") for layer in directions]
        projections = [lambda ids, table=table: tf.gather(table, ids) for table in tables]
    else:
        projections = [lambda ids, cell=layer.cell: _projection(ids, embedding.embeddings, cell)
                       for layer in directions]
    if config.model == "bilstm":
        head, ngrams = model.get_layer("probability"), None
    else:  # the Bi-LSTM's score plus the n-grams', under a sigmoid
        head, ngrams = model.get_layer("bilstm_score"), model.get_layer("ngrams")

    def fast(ids: tf.Tensor, lengths: tf.Tensor) -> tf.Tensor:
        # The loop's time padding (`fused.TIME_BUCKET`) done on the ids: cheaper than on x·W.
        ids = tf.pad(ids, [[0, 0], [0, -tf.shape(ids)[1] % fused.TIME_BUCKET]])
        # Each direction reads its sequences in order (the backward one each reversed up to
        # its length): pooling does not depend on the order of the steps.
        read = (ids, tf.reverse_sequence(ids, lengths, seq_axis=1, batch_axis=0))
        pooled = [fused.pooled_inference(project(tf.transpose(ids_read)), lengths,
                                         layer.cell.recurrent_kernel)
                  for ids_read, project, layer in zip(read, projections, directions,
                                                      strict=True)]
        # `MaskedMeanMaxPooling` of the two directions' outputs, concatenated.
        count = tf.cast(lengths, tf.float32)[:, None]
        mean = tf.concat([total for total, _ in pooled], -1) / tf.maximum(count, 1.0)
        peak = tf.where(count > 0, tf.concat([peak for _, peak in pooled], -1), 0.0)
        score = head(tf.concat([mean, peak], -1))
        if ngrams is not None:
            score = keras.activations.sigmoid(score + ngrams(ids))
        return score[:, 0]

    def probability(ids: tf.Tensor) -> tf.Tensor:
        lengths, right_padded = fused.right_padded_lengths(tf.not_equal(ids, 0))
        return tf.cond(right_padded, lambda: fast(ids, lengths), lambda: by_model(ids))

    return probability


def _projection(ids: tf.Tensor, embeddings: Any, cell: Any) -> tf.Tensor:
    """x_t·W + b of `ids` (any shape) through the embedding, as one 2-D matmul."""
    x = tf.reshape(tf.gather(embeddings, ids), [-1, embeddings.shape[-1]])
    xw = tf.matmul(x, cell.kernel) + cell.bias
    return tf.reshape(xw, tf.concat([tf.shape(ids), tf.shape(xw)[-1:]], 0))
