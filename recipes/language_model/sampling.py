"""Scoring and generation with the step model, as TF functions that export as signatures.

Both prepend the start token (`<eos>` at word level, `"\\n"` at character level:
what precedes a sentence or a line), so an empty prompt starts from the start
state, and the first real token is scored given only the start token. Tokens
not in the vocabulary map to the unknown token (id 0).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from recipes.language_model.input_pipeline import tokenize


class LanguageModelFunctions(tf.Module):
    """`score(text)` and `generate(prompt, num_tokens, temperature, top_k)` for a step model."""

    def __init__(self, model: keras.Model, lookup: keras.layers.StringLookup,
                 inverse: keras.layers.StringLookup, config: Any) -> None:
        super().__init__()
        self.model, self.lookup, self.inverse = model, lookup, inverse
        self.level, self.chunk = config.level, config.score_chunk
        self.standardize = config.get("standardize", "")  # (runs older than the field)
        self.start_id = int(lookup(tf.constant(config.start_token)))
        self.shapes = [config.units] * (2 * config.num_layers)

    def _ids(self, text: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Start token + token ids, right-padded `[batch, time]`, and the lengths."""
        ids = tf.cast(self.lookup(tokenize(text, self.level, self.standardize)), tf.int32)
        start = tf.fill([tf.shape(text)[0], 1], self.start_id)
        ids = tf.concat([tf.RaggedTensor.from_tensor(start), ids], axis=1)
        return ids.to_tensor(0), tf.cast(ids.row_lengths(), tf.int32)

    def _zero_states(self, batch: tf.Tensor) -> list[tf.Tensor]:
        return [tf.zeros([batch, units]) for units in self.shapes]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def score(self, text: tf.Tensor) -> dict[str, tf.Tensor]:
        """Log-probabilities (nats) of each text's tokens, each text from the start state.

        Returns `log_probs` float32 `[batch, max_tokens]` (0 past a text's end),
        `num_tokens` int32 `[batch]` and `total_log_prob` float32 `[batch]`;
        perplexity = exp(-sum(total_log_prob) / sum(num_tokens)). Long texts run
        in chunks of `config.score_chunk` steps with the state carried.
        """
        ids, lengths = self._ids(text)
        batch, steps = tf.shape(ids)[0], tf.shape(ids)[1] - 1
        num_chunks = tf.maximum((steps + self.chunk - 1) // self.chunk, 1)
        pad = num_chunks * self.chunk - steps
        inputs = tf.pad(ids[:, :-1], [[0, 0], [0, pad]])
        targets = tf.pad(ids[:, 1:], [[0, 0], [0, pad]])
        mask = tf.sequence_mask(lengths - 1, num_chunks * self.chunk)

        def body(k, states, log_probs):
            window = slice(None), slice(k * self.chunk, (k + 1) * self.chunk)
            logits, *states = self.model([inputs[window], mask[window], *states],
                                         training=False)
            log_p = -tf.nn.sparse_softmax_cross_entropy_with_logits(targets[window], logits)
            log_p = tf.where(mask[window], log_p, 0.0)
            return k + 1, states, log_probs.write(k, tf.transpose(log_p))

        _, _, log_probs = tf.while_loop(
            lambda k, *_: k < num_chunks, body,
            (0, self._zero_states(batch), tf.TensorArray(tf.float32, size=num_chunks)))
        log_probs = tf.transpose(tf.reshape(log_probs.stack(), [-1, batch]))[:, :steps]
        return {"log_probs": log_probs, "num_tokens": lengths - 1,
                "total_log_prob": tf.reduce_sum(log_probs, axis=1)}

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string, name="prompt"),
        tf.TensorSpec([], tf.int32, name="num_tokens"),
        tf.TensorSpec([], tf.float32, name="temperature"),
        tf.TensorSpec([], tf.int32, name="top_k"),
    ])
    def generate(self, prompt: tf.Tensor, num_tokens: tf.Tensor, temperature: tf.Tensor,
                 top_k: tf.Tensor) -> dict[str, tf.Tensor]:
        """Samples `num_tokens` tokens after each prompt; returns the continuation `text`.

        `temperature` <= 0 picks the most likely token; `top_k` > 0 samples
        among the k most likely only. The text continues the prompt as is: at
        word level each word is preceded by a space, and `<eos>` is a line end.
        """
        ids, lengths = self._ids(prompt)
        batch = tf.shape(ids)[0]
        mask = tf.sequence_mask(lengths, tf.shape(ids)[1])
        # Masked steps keep the state and repeat the output: the last column is each
        # prompt's last real step.
        logits, *states = self.model([ids, mask, *self._zero_states(batch)], training=False)
        logits = logits[:, -1]
        vocab = tf.shape(logits)[-1]
        k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)

        def body(t, logits, states, tokens):
            kth = tf.math.top_k(logits, k).values[:, -1:]
            logits = tf.where(logits < kth, -1e9, logits)
            sampled = tf.random.categorical(logits / tf.maximum(temperature, 1e-6), 1,
                                            dtype=tf.int32)
            greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)[:, None]
            token = tf.where(temperature > 0, sampled, greedy)
            logits, *states = self.model([token, tf.ones_like(token, tf.bool), *states],
                                         training=False)
            return t + 1, logits[:, -1], states, tf.concat([tokens, token], axis=1)

        tokens = tf.zeros([batch, 0], tf.int32)
        _, _, _, tokens = tf.while_loop(
            lambda t, *_: t < num_tokens, body, (0, logits, states, tokens),
            shape_invariants=(tf.TensorShape([]), logits.shape,
                              [s.shape for s in states], tf.TensorShape([None, None])))
        words = self.inverse(tokens)
        if self.level == "char":
            return {"text": tf.strings.reduce_join(words, axis=-1)}
        text = tf.strings.reduce_join(" " + words, axis=-1)  # appends to the prompt
        return {"text": tf.strings.regex_replace(text, " <eos> ?", "\n")}
