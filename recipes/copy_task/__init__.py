"""recipes.copy_task: the long-delay copy task, LSTM vs plain RNN (Arjovsky et al., 2016)."""
