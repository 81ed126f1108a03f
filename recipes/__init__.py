"""The training recipes: `python -m recipes.NAME`, run from the repository's root."""

from recipes.common import console

console.import_tensorflow_quietly()  # before anything else imports TensorFlow
