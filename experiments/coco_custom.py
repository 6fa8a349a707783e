"""The `coco_custom` config, kept under this path for existing commands: it lives in the package
(sized_detr_jax/configs/coco_custom.py) so an installed `sized-detr --config=coco_custom` has it too."""
from sized_detr_jax.configs.coco_custom import TOKENS, get_config  # noqa: F401  pylint: disable=unused-import
