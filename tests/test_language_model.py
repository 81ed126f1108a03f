"""recipes.language_model: reader, TBPTT batching, carried state, scoring, export, errors."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from recipe_testing import (
    ROOT,
    assert_finished_run_stays_finished,
    assert_one_line_error,
    parse_config,
    run_recipe,
    summary_tags,
)

from configs import language_model as lm_config
from recipes.common import language_models as models
from recipes.common.errors import RecipeError
from recipes.language_model import input_pipeline, sampling, train

PTB = ROOT.parent / "shared" / "data" / "ptb"


def _run(*args, **kwargs):
    return run_recipe("language_model", *args, **kwargs)


def _config(variant="smoke", **overrides):
    config = lm_config.get_config(variant)
    config.update(overrides)
    return config


def _functions(config, vocab, weights_scale=None):
    lookup = input_pipeline.make_lookup(config, vocab)
    step = models.create_model(config, len(vocab) + 1)
    if weights_scale is not None:
        step.set_weights([w * weights_scale for w in step.get_weights()])
    return sampling.LanguageModelFunctions(
        step, lookup, input_pipeline.make_lookup(config, vocab, invert=True), config)


def test_tbptt_batches_reassemble_the_stream():
    stream = np.arange(1000, dtype=np.int32)
    batches = list(input_pipeline.tbptt_batches(stream, batch_size=4, num_steps=7))
    inputs = np.concatenate([x.numpy() for x, _ in batches], axis=1)
    targets = np.concatenate([y.numpy() for _, y in batches], axis=1)
    row_length = 999 // 4
    assert len(batches) == row_length // 7
    assert all(x.shape == (4, 7) for x, _ in batches)
    for r in range(4):  # row r of batch k+1 continues row r of batch k
        start = r * row_length
        np.testing.assert_array_equal(inputs[r], stream[start:start + inputs.shape[1]])
        np.testing.assert_array_equal(targets[r], stream[start + 1:start + 1 + inputs.shape[1]])


def test_tbptt_batches_too_short():
    with pytest.raises(input_pipeline.RecipeError, match="too short"):
        input_pipeline.tbptt_batches(np.arange(50, dtype=np.int32), 4, 20)


@pytest.mark.skipif(not PTB.is_dir(), reason="needs ../shared/data/ptb")
def test_ptb_reader_matches_the_published_counts(tmp_path):
    config = _config("ptb_small", text_dir=str(PTB))
    train_text, val_text, test_text = input_pipeline.read_splits(config)
    vocab = input_pipeline.build_vocabulary(config, train_text, tmp_path / "vocab.json")
    assert len(vocab) + 1 == 10000 and "<unk>" not in vocab and "<eos>" in vocab
    lookup = input_pipeline.make_lookup(config, vocab)
    assert [len(input_pipeline.to_stream(t, lookup, config))
            for t in (train_text, val_text, test_text)] == [929589, 73760, 82430]
    stream = input_pipeline.to_stream(val_text, lookup, config)
    words = val_text.replace("\n", " <eos> ").split()
    back = input_pipeline.make_lookup(config, vocab, invert=True)(stream).numpy()
    assert [w.decode() for w in back] == words  # valid has no word outside the vocabulary
    assert json.loads((tmp_path / "vocab.json").read_text()) == vocab


def test_examples_are_joined_with_one_line_end():
    assert input_pipeline.join_examples(["a b", "c\n", "d", ""]) == "a b\nc\nd\n"
    assert input_pipeline.join_examples(["one example\n"]) == "one example\n"
    assert input_pipeline.join_examples([]) == ""


def test_character_tokens_keep_line_ends_and_unknowns(tmp_path):
    config = _config()
    vocab = input_pipeline.build_vocabulary(config, "ab\nbb\n", tmp_path / "vocab.json")
    assert vocab == ["b", "\n", "a"]  # most frequent first
    lookup = input_pipeline.make_lookup(config, vocab)
    np.testing.assert_array_equal(input_pipeline.to_stream("ab\nz😀", lookup, config),
                                  [3, 1, 2, 0, 0])


def test_stateful_model_carries_state_across_batches():
    config = _config(units=6, embedding_dim=5, num_layers=2)
    stateful = models.create_model(config, 11, batch_size=3)
    step = models.create_model(config, 11)
    step.set_weights(stateful.get_weights())
    tokens = np.random.default_rng(0).integers(0, 11, (3, 10)).astype(np.int32)
    zeros = [np.zeros((3, 6), np.float32)] * 4
    whole = step([tokens, np.ones_like(tokens, bool), *zeros])[0].numpy()
    parts = [stateful(tokens[:, :4]).numpy(), stateful(tokens[:, 4:]).numpy()]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, atol=1e-5)
    models.reset_states(stateful)  # the next epoch starts over
    np.testing.assert_allclose(stateful(tokens[:, :4]).numpy(), whole[:, :4], atol=1e-5)


def test_uniform_model_perplexity_is_the_vocabulary_size():
    config = _config("ptb_small", units=8, embedding_dim=4, score_chunk=16)
    vocab = [f"w{i}" for i in range(48)] + ["<eos>"]  # + the unknown token: 50
    functions = _functions(config, vocab, weights_scale=0.0)  # all logits 0
    text = "w1 w2 w3\nw4 unknown w5\n" * 20
    for rows in (1, 3):
        metrics = train.evaluate(functions, text, "word", rows=rows)
        assert metrics["tokens"] == 8 * 20
        assert metrics["perplexity"] == pytest.approx(50, rel=1e-5)


def test_split_lines_keeps_every_line_once():
    text = "".join(f"line {i}\n" for i in range(100)) + "no line end"
    pieces = train.split_lines(text, 7)
    assert len(pieces) == 7 and "".join(pieces) == text
    assert all(p.endswith("\n") for p in pieces[:-1])
    assert max(map(len, pieces)) < 2 * len(text) / 7


def test_score_is_independent_of_chunking_and_batching():
    config = _config(units=8, embedding_dim=4)
    vocab = list("abcdefgh \n")
    texts = ["abc def\ngh", "", "hgf edc ba\n" * 5, "x"]
    one_chunk = _functions(config.copy_and_resolve_references(), vocab)
    small = config.copy_and_resolve_references()
    small.score_chunk = 3
    chunked = _functions(small, vocab)
    chunked.model.set_weights(one_chunk.model.get_weights())
    batch = one_chunk.score(tf.constant(texts))
    np.testing.assert_array_equal(batch["num_tokens"], [len(t) for t in texts])
    for i, text in enumerate(texts):
        for functions in (one_chunk, chunked):
            alone = functions.score(tf.constant([text]))
            np.testing.assert_allclose(alone["total_log_prob"][0], batch["total_log_prob"][i],
                                       atol=1e-4)
            n = len(text)
            np.testing.assert_allclose(alone["log_probs"][0, :n], batch["log_probs"][i, :n],
                                       atol=1e-5)
    assert float(batch["total_log_prob"][1]) == 0.0  # the empty text has no token


def test_greedy_generation_follows_the_scores():
    """Each greedy token is the argmax of the model given the prompt and what came before."""
    config = _config("ptb_small", units=8, embedding_dim=4)
    vocab = ["the", "cat", "sat", "<eos>"]
    candidates = [*vocab, "<unk>"]  # id 0, the unknown token, can be generated too
    functions = _functions(config, vocab, weights_scale=30.0)  # peaked distributions
    text = functions.generate(tf.constant(["the cat", "", "dog"]), 6, 0.0, 0)["text"].numpy()
    for prompt, continuation in zip(["the cat", "", "dog"], text, strict=True):
        assert continuation.decode()[0] in " \n"  # appends to the prompt as is
        words = continuation.decode().replace("\n", " <eos> ").split()
        assert len(words) == 6 and set(words) <= set(candidates)
        context = prompt
        for word in words:  # the chosen word scores best among all candidates
            scores = [float(functions.score(tf.constant([f"{context} {w}"]))["log_probs"][
                0, len(context.split())]) for w in candidates]
            assert scores[candidates.index(word)] == pytest.approx(max(scores), abs=1e-4)
            context = f"{context} {word}"


def test_smoke_run_writes_metrics_and_summaries(language_model_run):
    metrics = json.loads((language_model_run / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert metrics[split]["tokens"] == 20000
        assert metrics[split]["bits_per_char"] == pytest.approx(
            metrics[split]["cross_entropy"] / math.log(2))
        assert metrics[split]["cross_entropy"] < math.log(metrics["vocab_size"])  # learnt
    tags = summary_tags(language_model_run / "tensorboard")
    assert {"train_cross_entropy", "eval_cross_entropy", "eval_bits_per_char",
            "learning_rate", "samples", "steps/train_loss"} <= tags, tags
    assert not (language_model_run / "backup").exists()


def test_a_finished_run_stays_finished(language_model_run, capsys):
    assert_finished_run_stays_finished("language_model", "smoke", language_model_run, capsys)


def test_export_generates_and_scores_in_fresh_process(language_model_run):
    script = textwrap.dedent(f"""
        import json, sys
        import tensorflow as tf
        loaded = tf.saved_model.load({str(language_model_run / "export" / "1")!r})
        generate, score = loaded.signatures["generate"], loaded.signatures["score"]
        prompts = ["ROMEO:", "", "\\u00ff unknown \\U0001F600"]
        args = dict(prompt=tf.constant(prompts), num_tokens=tf.constant(25),
                    temperature=tf.constant(0.0), top_k=tf.constant(0))
        greedy = [generate(**args)["text"].numpy().tolist() for _ in range(2)]
        args.update(temperature=tf.constant(1.0), top_k=tf.constant(3))
        sampled = generate(**args)["text"].numpy()
        scored = score(text=tf.constant(["First Citizen:", ""]))
        assert not [m for m in sys.modules if m.startswith(("lstm_tf", "recipes"))]
        print(json.dumps({{"greedy": [[t.decode() for t in g] for g in greedy],
                          "sampled": [t.decode() for t in sampled],
                          "num_tokens": scored["num_tokens"].numpy().tolist(),
                          "total": scored["total_log_prob"].numpy().tolist()}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, cwd="/")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["greedy"][0] == out["greedy"][1]  # temperature 0 is deterministic
    for text in out["greedy"][0] + out["sampled"]:
        assert len(text) == 25
    assert out["num_tokens"] == [14, 0]
    assert out["total"][0] < 0 and out["total"][1] == 0


def test_score_reproduces_the_test_metric(language_model_run, tmp_path):
    import tensorflow_datasets as tfds

    from recipes.language_model import deploy

    metrics = json.loads((language_model_run / "metrics.json").read_text())
    test = tfds.load("tiny_shakespeare", split="test", try_gcs=False, download=False)
    text = next(iter(test))["text"].numpy().decode()[:20000]
    (tmp_path / "test.txt").write_text(text, encoding="utf-8")
    (line,) = deploy.score(str(language_model_run / "export"), [str(tmp_path / "test.txt")])
    fields = dict(f.split(" ") for f in line.split("\t")[1:])
    assert int(fields["tokens"]) == 20000
    assert float(fields["cross_entropy"]) == pytest.approx(
        metrics["test"]["cross_entropy"], abs=1e-3)


def test_command_line(language_model_run):
    """The entry point: `sample` prints the prompt and a continuation; a mistake is one line."""
    from recipes.language_model import deploy

    proc = _run("sample", f"--model={language_model_run / 'export'}", "--prompt=ROMEO:",
                "--num_tokens=30", "--temperature=0")
    expected = deploy.sample(str(language_model_run / "export"), "ROMEO:", 30, 0.0, 0)
    assert proc.stdout == "ROMEO:" + expected + "\n" and len(expected) == 30
    assert_one_line_error(_run("generate", check=False), "unknown command 'generate'")


@pytest.mark.parametrize("variant, overrides, message", [
    ("ptb_small", {"text_dir": "{tmp}/none"}, "no corpus file"),
    ("smoke", {"level": "byte"}, "--config.level='byte' is invalid"),
    ("imdb_smoke", {"standardize": "Sentiment"}, "--config.standardize='Sentiment' is invalid"),
    ("smoke", {"num_steps": 0}, "--config.num_steps=0 is invalid"),
    ("smoke", {"num_steps": 5000}, "too short"),
    ("smoke", {"text_feature": "body"}, "not a feature of 'tiny_shakespeare'"),
    ("smoke", {"optimizer": "rmsprop"}, "--config.optimizer='rmsprop' is invalid"),
])
def test_bad_config_values(tmp_path, variant, overrides, message):
    overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v
                 for k, v in overrides.items()}
    with pytest.raises(RecipeError, match=message):
        train.train_and_evaluate(_config(variant, **overrides), str(tmp_path / "run"))


def test_bad_variant():
    with pytest.raises(RecipeError, match="unknown variant 'nope'"):
        parse_config("language_model", "--config=configs/language_model.py:nope")


def test_bad_commands(tmp_path):
    from recipes.language_model import deploy

    with pytest.raises(RecipeError, match="no SavedModel in"):
        deploy.sample(str(tmp_path), "", 3, 0.0, 0)
    with pytest.raises(RecipeError, match="score needs text files"):
        deploy.score(str(tmp_path), [])
    with pytest.raises(RecipeError, match="tflite_int8 is not offered"):
        deploy.export(str(tmp_path), ["tflite_int8"])


@pytest.mark.parametrize("variant", lm_config.VARIANTS)
def test_config_variants_pass_the_checks(variant):
    train.errors.check_config(lm_config.get_config(variant), train.CONFIG_RULES)
