"""Small shared layers: the DETR MLP and DINO's clamped inverse sigmoid."""
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

INVERSE_SIGMOID_EPS = 1e-3


def inverse_sigmoid(x, eps=INVERSE_SIGMOID_EPS):
  """`log(x / (1 - x))` with x clamped to [0, 1] and both terms to >= eps (DINO util.misc)."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


class MLP(nn.Module):
  """`num_layers` Dense layers with ReLU between them (DETR `MLP`), named layers_0.. layers_{n-1}.

  Attributes:
    hidden_dim: width of the hidden layers.
    output_dim: width of the last layer.
    num_layers: number of Dense layers.
    last_zero_init: zero-initialise the last layer (DINO's box heads).
    dtype: compute dtype.
  """
  hidden_dim: int
  output_dim: int
  num_layers: int
  last_zero_init: bool = False
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      init = nn.initializers.zeros if (last and self.last_zero_init) else self.kernel_init
      x = nn.Dense(self.output_dim if last else self.hidden_dim, kernel_init=init,
                   dtype=self.dtype, param_dtype=jnp.float32, name=f"layers_{i}")(x)
      if not last:
        x = nn.relu(x)
    return x
