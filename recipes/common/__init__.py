"""What every recipe shares, written once beside the recipes that use it.

* `errors`: `RecipeError` (a user mistake, reported as one line) and config checks;
* `cli`: the absl flags every recipe has, and `run(main)` with one-line errors;
* `console`: TensorFlow's and absl's INFO logging off unless asked for;
* `distribute`: the `tf.distribute` strategy from `--strategy`;
* `workdirs`: the run directory (creation, lock, resolved config, atomic JSON);
* `data`: TFDS loading with one-line errors;
* `text`: the text standardization of the sentiment recipe and the language model;
* `language_models`: the language model's network and a finished run's trained one
  (the language model recipe trains it, the sentiment recipe starts from it);
* `checkpoints`: NaN stop, best checkpoint, resumable backups (Keras callbacks);
* `summaries`: TensorBoard scalars per step and per epoch, gate histograms;
* `exports`: versioned, atomic SavedModel exports and finding the latest one.
"""
