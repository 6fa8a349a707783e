"""The `synthetic` config, kept under this path for existing commands: it lives in the package
(sized_detr_jax/configs/synthetic.py) so an installed `sized-detr --config=synthetic` has it too."""
from sized_detr_jax.configs.synthetic import TOKENS, get_config  # noqa: F401  pylint: disable=unused-import
