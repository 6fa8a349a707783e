"""The method registry: `config.method` -> `build(config) -> method.Method`.

The only place that lists methods (as big_vision picks models by name). A new DETR variant is
a new folder with `build(config)` plus one line here.
"""
from sized_detr_jax import co_dino
from sized_detr_jax import dino_method
from sized_detr_jax import semi

BUILDERS = {
    "dino": dino_method.build,
    "semi_detr": semi.build,
    "co_dino": co_dino.build,
}


def build(config):
  """The `method.Method` named by `config.method` (default "dino"), built from `config`."""
  name = config.get("method", "dino")
  if name not in BUILDERS:
    raise ValueError(f"config.method must be one of {tuple(BUILDERS)}, got {name!r}")
  return BUILDERS[name](config)
