"""Text without spaces (character tokens) and the `explain` signature and command.

References: TensorFlow's `TextVectorization` (the Python tokenizer), the layer's
own outputs (the traced hidden states), the export's `serving_default` (the
probability, and the occlusion that measures each token's influence).
"""

import json

import numpy as np
import pytest
import tensorflow as tf
from recipe_testing import summary_tags

from recipes.common.errors import RecipeError
from recipes.sentiment import explain, input_pipeline
from recipes.sentiment.deploy import run_config
from recipes.sentiment.tokenizer import Tokenizer

ZH = ["我爱中国", "这本书非常好，我很喜欢", "质量太差了，非常失望！！", "",
      "Ｏｋ。。。还行吧「一般」"]


def test_character_tokens_in_graph_and_in_python(sentiment_zh_run):
    config = run_config(sentiment_zh_run / "config.json")
    vectorizer = input_pipeline.make_vectorizer(config, None, sentiment_zh_run / "vocab.txt")
    tokenizer = Tokenizer.from_run(sentiment_zh_run, config)
    (reviews,) = input_pipeline.load_texts(config, ["test[:300]"])
    texts = [t.decode() for t, _ in reviews.as_numpy_iterator()] + ZH
    tokens = input_pipeline.tokens(tf.constant(texts), config)
    ids = input_pipeline.to_ids(vectorizer, tf.constant(texts), config.max_length).numpy()
    for text, row, words in zip(texts, ids, tokens.to_list(), strict=True):
        assert tokenizer.tokens(text)[:config.max_length] == [w.decode() for w in words]
        assert tokenizer.ids(text) == [int(i) for i in row if i], text
    assert tokenizer.tokens("质量太差了，非常失望！") == list("质量太差了非常失望")  # (punctuation)


@pytest.mark.parametrize("ngrams", [2, 3])
def test_ngrams_as_the_vectorizer_makes_them(tmp_path, ngrams):
    from configs import sentiment

    config = sentiment.get_config("zh_smoke")
    config.ngrams = ngrams
    texts = ["我爱中国", "好", "", "质量太差了"]
    train = tf.data.Dataset.from_tensor_slices((texts, [1, 1, 0, 0]))
    vectorizer = input_pipeline.make_vectorizer(config, train, tmp_path / "vocab.txt")
    vocab = (tmp_path / "vocab.txt").read_text(encoding="utf-8").split("\n")
    tokenizer = Tokenizer(vocab, config.max_length, config.split, ngrams)
    ids = input_pipeline.to_ids(vectorizer, tf.constant(texts), config.max_length).numpy()
    for text, row, words in zip(texts, ids, input_pipeline.tokens(tf.constant(texts), config)
                                .to_list(), strict=True):
        assert tokenizer.ids(text) == [int(i) for i in row if i]
        assert tokenizer.tokens(text) == [w.decode() for w in words]
    assert tokenizer.tokens("我爱中国")[4:7] == ["我 爱", "爱 中", "中 国"]


def _export(run):
    return tf.saved_model.load(str(run / "export" / "1"))


def test_explain_signature(sentiment_zh_run):
    loaded = _export(sentiment_zh_run)
    out = {k: v.numpy() for k, v in loaded.signatures["explain"](text=tf.constant(ZH)).items()}
    units = run_config(sentiment_zh_run / "config.json").lstm_units
    assert out["tokens"][0].tolist()[:5] == [c.encode() for c in "我爱中国"] + [b""]
    width = out["tokens"].shape[1]
    for name in ("forget_gate", "input_gate", "output_gate", "cell_state", "hidden_state"):
        assert out[name].shape == (len(ZH), 2, width, units)
        assert np.all(out[name][0, :, 4:] == 0) and np.all(out[name][3] == 0)  # past the end
    gates = out["forget_gate"][0, :, :4]
    assert np.all((gates > 0) & (gates < 1))
    serve = loaded.signatures["serving_default"]
    np.testing.assert_allclose(out["probability"], serve(text=tf.constant(ZH))["probability"],
                               atol=1e-6)
    for k, text in enumerate(ZH):  # alone = inside the padded batch
        alone = loaded.signatures["explain"](text=tf.constant([text]))
        n = alone["tokens"].shape[1]
        for name in ("forget_gate", "cell_state", "hidden_state"):
            np.testing.assert_allclose(alone[name][0], out[name][k, :, :n], atol=1e-6)


def test_explain_hidden_states_are_the_layers_outputs(sentiment_zh_run):
    """The traced h_t of both directions = the Bi-LSTM layer's own outputs, concatenated."""
    from recipes.sentiment import model as models

    config = run_config(sentiment_zh_run / "config.json")
    model = models.create_model(config)
    model.load_weights(sentiment_zh_run / "checkpoints" / "best.weights.h5")
    vectorizer = input_pipeline.make_vectorizer(config, None, sentiment_zh_run / "vocab.txt")
    ids = input_pipeline.to_ids(vectorizer, tf.constant(ZH), config.max_length)
    bi = next(layer for layer in model.layers if "bidirectional" in layer.name)
    embedded = model.layers[1](ids)
    expected = bi(embedded, mask=ids != 0).numpy()
    traced = explain.explain_function(model, vectorizer, config)(tf.constant(ZH))
    hidden = traced["hidden_state"].numpy()
    real = (ids.numpy() != 0)[..., None]
    np.testing.assert_allclose(np.where(real, expected, 0),
                               np.concatenate([hidden[:, 0], hidden[:, 1]], axis=-1), atol=1e-5)


def test_explain_command_writes_a_table_and_a_picture(sentiment_zh_run, tmp_path, capsys):
    out = tmp_path / "zh.png"
    other = tmp_path / ".tmp-build"  # someone else's file: the output folder is theirs
    other.write_text("keep")
    results = explain.explain(str(sentiment_zh_run / "export"), ["我爱中国", ""], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-build", "zh.png"]
    printed = capsys.readouterr().out
    assert "token\tfw f" in printed and "(no tokens)" in printed
    assert [line.split("\t")[0] for line in printed.splitlines()[2:6]] == list("我爱中国")
    serve = _export(sentiment_zh_run).signatures["serving_default"]
    full = float(serve(text=tf.constant(["我爱中国"]))["probability"][0])
    without_love = float(serve(text=tf.constant(["我中国"]))["probability"][0])
    assert results[0]["influence"][1] == pytest.approx(full - without_love, abs=1e-6)
    assert results[1]["tokens"] == [] and results[1]["influence"].size == 0


def test_explain_errors(sentiment_zh_run, copy_task_run, tmp_path):
    with pytest.raises(RecipeError, match="has no `explain` signature"):
        explain.explain(str(copy_task_run / "export"), ["x"], str(tmp_path / "a.png"))
    with pytest.raises(RecipeError, match="no SavedModel in"):
        explain.explain(str(tmp_path / "none"), ["x"], str(tmp_path / "a.png"))
    with pytest.raises(RecipeError, match="cannot write"):
        explain.explain(str(sentiment_zh_run / "export"), ["x"], str(tmp_path / "no" / "a.png"))
    with pytest.raises(RecipeError, match="explain needs texts"):
        explain.explain(str(sentiment_zh_run / "export"), [], str(tmp_path / "a.png"))


def test_tensorboard_shows_the_explain_picture(sentiment_zh_run):
    assert "explain" in summary_tags(sentiment_zh_run / "tensorboard" / "explain")
    config = json.loads((sentiment_zh_run / "config.json").read_text())
    assert config["explain_texts"][0] == "我爱中国" and config["split"] == "character"


def test_explain_with_ngrams_removes_single_tokens_only(tmp_path):
    """With n-grams the model reads the characters, then their 2-grams; occlusion removes
    characters (their n-grams go with them), an n-gram's own influence is NaN."""
    from configs import sentiment
    from recipes.sentiment import model as models

    config = sentiment.get_config("zh_smoke")
    config.ngrams = 2
    texts = ["我爱中国", "好", "质量太差了"]
    train = tf.data.Dataset.from_tensor_slices((texts, [1, 1, 0]))
    vectorizer = input_pipeline.make_vectorizer(config, train, tmp_path / "vocab.txt")
    model = models.create_model(config)

    def predict(texts):
        ids = input_pipeline.to_ids(vectorizer, tf.constant(texts), config.max_length)
        return model(ids, training=False).numpy()[:, 0]

    (result,) = explain.explanations(explain.explain_function(model, vectorizer, config),
                                     predict, ["我爱中国"])
    assert result["tokens"] == [*"我爱中国", "我 爱", "爱 中", "中 国"]
    assert result["forget_gate"].shape == (2, 7, config.lstm_units)
    expected = result["probability"] - predict(["爱中国", "我中国", "我爱国", "我爱中"])
    np.testing.assert_allclose(result["influence"][:4], expected, atol=1e-6)
    assert np.all(np.isnan(result["influence"][4:]))
    assert "我 爱\t" in explain.table(result) and "\t-" in explain.table(result)
