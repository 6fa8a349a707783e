"""The `dino_r50` config, kept under this path for existing commands: it lives in the package
(sized_detr_jax/configs/dino_r50.py) so an installed `sized-detr --config=dino_r50` has it too."""
from sized_detr_jax.configs.dino_r50 import TOKENS, get_config  # noqa: F401  pylint: disable=unused-import
