"""effjax.data: offline data sets as TFDS builders (array_record, no TensorFlow) and a
deterministic batch iterator."""

from effjax.data._batches import batches, num_batches
from effjax.data._common import default_data_dir, to_arrays
from effjax.data.digits import Digits, load_digits_source
from effjax.data.fashion_mnist import FashionMnist, load_fashion_mnist_source
from effjax.data.shakespeare import ShakespeareChar, load_shakespeare_char_source
from effjax.data.shakespeare_genre import ShakespeareGenre, load_shakespeare_genre_source

__all__ = ["batches", "num_batches", "Digits", "load_digits_source",
           "FashionMnist", "load_fashion_mnist_source",
           "ShakespeareChar", "load_shakespeare_char_source",
           "ShakespeareGenre", "load_shakespeare_genre_source", "default_data_dir",
           "to_arrays"]
