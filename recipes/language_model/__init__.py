"""recipes.language_model: LSTM language models (char-level Shakespeare, word-level PTB)."""
