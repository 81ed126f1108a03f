"""Bi-LSTM sentiment classification: `python -m recipes.sentiment`."""
