"""The `semi_detr` config, kept under this path for existing commands: it lives in the package
(sized_detr_jax/configs/semi_detr.py) so an installed `sized-detr --config=semi_detr` has it too."""
from sized_detr_jax.configs.semi_detr import TOKENS, get_config  # noqa: F401  pylint: disable=unused-import
