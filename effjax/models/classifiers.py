"""Small Flax NNX classifiers for the experiments: an MLP and a CNN.

Both are deliberately plain (``nnx.Linear`` / ``nnx.Conv`` kernels with the usual Flax layouts:
``(in, out)`` and ``(kh, kw, in, out)``), so their parameter trees are what the optimizers,
PEFT rewriters and quantizers of effjax see in real models.

Example::

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from effjax.models import CNN, MLP
  >>> MLP((64, 32, 10), rngs=nnx.Rngs(0))(jnp.ones((4, 64))).shape
  (4, 10)
  >>> CNN(num_classes=10, rngs=nnx.Rngs(0))(jnp.ones((2, 28, 28))).shape
  (2, 10)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["MLP", "CNN"]


class MLP(nnx.Module):
    """Multilayer perceptron with layer sizes ``sizes``: ``x_{l+1} = act(W_l x_l + b_l)``.

    No activation after the last layer: ``W_L x_L + b_L`` are the outputs.

    Args:
      sizes: ``(in, hidden_1, ..., out)``, at least two entries.
      activation: applied between layers (not after the last).
      rngs: ``nnx.Rngs`` for the initializers (LeCun normal kernels, zero biases).
    """

    def __init__(self, sizes: Sequence[int], *, activation: Callable = jax.nn.gelu,
                 rngs: nnx.Rngs):
        if len(sizes) < 2:
            raise ValueError(f"MLP needs (in, ..., out) sizes, got {tuple(sizes)}")
        self.activation = activation
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.activation(x)
        return x


class CNN(nnx.Module):
    """A LeNet-style CNN for small images: ``[conv3x3 -> relu -> avgpool2]`` per entry of
    ``channels``, then ``dense(hidden) -> relu -> dense(num_classes)``.

    Inputs are ``(batch, H, W)`` (one channel) or ``(batch, H, W, C)``; ``H`` and ``W`` must be
    divisible by ``2 ** len(channels)``.
    """

    def __init__(self, num_classes: int = 10, *, channels: Sequence[int] = (32, 64),
                 hidden: int = 128, in_channels: int = 1, image_size: int = 28,
                 rngs: nnx.Rngs):
        if image_size % 2 ** len(channels):
            raise ValueError(f"image_size {image_size} is not divisible by "
                             f"2**{len(channels)} (one 2x2 pool per conv)")
        sizes = (in_channels, *channels)
        self.convs = nnx.List([nnx.Conv(a, b, kernel_size=(3, 3), rngs=rngs)
                               for a, b in zip(sizes[:-1], sizes[1:])])
        side = image_size // 2 ** len(channels)
        self.hidden = nnx.Linear(side * side * channels[-1], hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        x = x.astype(jnp.float32)
        for conv in self.convs:
            x = nnx.avg_pool(jax.nn.relu(conv(x)), window_shape=(2, 2), strides=(2, 2))
        x = jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))
        return self.out(x)
