"""The `co_dino` config, kept under this path for existing commands: it lives in the package
(sized_detr_jax/configs/co_dino.py) so an installed `sized-detr --config=co_dino` has it too."""
from sized_detr_jax.configs.co_dino import TOKENS, get_config  # noqa: F401  pylint: disable=unused-import
