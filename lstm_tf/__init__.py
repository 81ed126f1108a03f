"""lstm_tf: the LSTM from first principles, for Keras 3 and TensorFlow."""

from lstm_tf.bidirectional import Bidirectional
from lstm_tf.cell import LSTMCell
from lstm_tf.lstm import LSTM

__all__ = ["LSTMCell", "LSTM", "Bidirectional"]
__version__ = "0.1.0"
