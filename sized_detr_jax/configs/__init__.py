"""The experiment configs shipped with the package, by name, and what their tokens mean.

A config is a module here with `get_config(arg)` and `TOKENS`; `arg` is a comma-separated list of
tokens ("sized_l1,smoke"). Name them as `NAME[:TOKENS]` (`dino_r50:coco91`) or as a file path
(`experiments/dino_r50.py:coco91`, `my_config.py`); `resolve` turns either into a file path that
ml_collections' `config_flags` can load. Every token means one thing in every config: its meaning
is the `TOKEN_MEANINGS` entry, and `describe()` prints the table (`sized-detr --list-configs`).

This module imports nothing beyond the standard library: `config_lib` resolves names through it,
and the config modules import `config_lib`.
"""
import importlib
import os
import textwrap
from typing import Any

# Config names, in the order `describe()` lists them; each has a module of that name here.
NAMES = ("synthetic", "dino_r50", "co_dino", "semi_detr", "coco_custom")

# One line per token. A token a config accepts must be in this table, with this meaning.
TOKEN_MEANINGS = {
    # Box loss (the paper's subject).
    "sized_l1": "Sized L1 instead of L1 where the method applies it (DINO: every branch; "
                "Co-DINO: the main DETR head), in the rescaled form (x/w errors times the "
                "batch's mean target width, y/h times its mean height: L1's magnitude)",
    "plain": "Sized L1 in the plain form (errors divided by the box size, no rescale); with "
             "Semi-DETR's sized_both / sized_sup, their Sized L1 in that form",
    "baseline": "Semi-DETR with L1 in both branches (the default)",
    "sized_both": "Semi-DETR with Sized L1 (rescaled unless `plain`) in the supervised and "
                  "the pseudo-label branch",
    "sized_sup": "Semi-DETR with Sized L1 (rescaled unless `plain`) in the supervised branch "
                 "only; L1 on pseudo-labels",
    # Size of the run.
    "smoke": "a few steps end to end on the CPU (tiny model, tiny embedded data), for tests",
    "tiny": "a small ResNet (1 block per stage, width 8), hidden 32, 1 + 2 layers, 30 queries",
    "synthetic": "a tiny model on the embedded synthetic dataset, on the CPU",
    "small": "the embedded dataset's small-object variant (generator size mix 0.75 / 0.17 / "
             "0.08: ~77% of boxes under 32x32 px at the training size, against ~44%)",
    "cpu": "the default run's tiny model at 160-192 px in one 192x192 bucket, for a 2-core CPU",
    # Numerics and kernels.
    "bf16": "bfloat16 compute (params, optimiser state, logits, boxes and losses float32)",
    "pallas": "deformable attention through the Pallas kernel (Triton on GPU) instead of the "
              "XLA gather",
    "invariant": "padding-invariant model (mask-aware backbone norms and query selection)",
    "coco91": "DINO's 91-row class layout indexed by COCO category id (official checkpoints)",
    # The method (coco_custom; the other configs are one method each).
    "co_dino": "Co-DINO as the method: DINO with Co-DETR's auxiliary heads and positive queries",
    "semi_detr": "Semi-DETR as the method: a teacher-student pair on labelled and unlabeled "
                 "images",
    # Co-DINO.
    "no_aux": "Co-DINO without its auxiliary heads and positive queries (the same DINO alone)",
    # Semi-DETR data and schedule.
    "p1": "COCO-partial 1% labels (120k iterations, switch at 60k)",
    "p5": "COCO-partial 5% labels (120k iterations, switch at 60k)",
    "p10": "COCO-partial 10% labels (120k iterations, switch at 60k; the default)",
    "full": "COCO-full: train2017 labelled + unlabeled2017 (240k iterations)",
    **{f"fold{i}": f"COCO-partial fold {i} (file names only)" for i in range(1, 6)},
    "iters120k": "120k iterations, switch at half (Semi-DETR's Table 5)",
    "iters300k": "300k iterations, switch at half (Semi-DETR's Table 5)",
    "noswitch": "one-to-many assignment for the whole run (Semi-DETR's Table 5 ablation)",
    "supervised": "with `synthetic`: DINO on the labelled images only (the supervised baseline)",
}


def _known(name: str) -> str:
  if name not in NAMES:
    raise ValueError(f"unknown config {name!r}; known: {', '.join(NAMES)}")
  return name


def module(name: str):
  """The config module `name` (one of `NAMES`)."""
  return importlib.import_module(f"{__name__}.{_known(name)}")


def get(name: str, arg: str | None = None) -> Any:
  """`get_config(arg)` of the config `name` (configs building on each other use this)."""
  return module(name).get_config(arg)


def path(name: str) -> str:
  """The file of the config `name`."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{_known(name)}.py")


def resolve(spec: str) -> str:
  """'NAME[:ARG]' -> '<this folder>/NAME.py[:ARG]'; a file path (anything else) is unchanged.

  A spec is a name when the part before ':' is one of `NAMES` and is not an existing file.
  """
  head, sep, arg = spec.partition(":")
  if head in NAMES and not os.path.exists(head):
    return path(head) + sep + arg
  return spec


def apply_box_loss_tokens(criterion, tokens) -> None:
  """`sized_l1` (the rescaled form) / `plain` (the plain form) on a criterion section, in place.

  Every config but Semi-DETR's (whose sized_both / sized_sup also pick the branches) calls this,
  so the two tokens select the same loss everywhere.
  """
  if "sized_l1" in tokens or "plain" in tokens:
    criterion.bbox_loss = "sized_l1"
    criterion.sized_l1_rescale = "plain" not in tokens


def summary_line(doc: str | None) -> str:
  """A docstring's first paragraph as one line ('' for None)."""
  return " ".join((doc or "").strip().split("\n\n")[0].split())


def describe() -> str:
  """Every config, its summary and its tokens with their meanings (one table for all)."""
  lines = []
  for name in NAMES:
    mod = module(name)
    lines += textwrap.wrap(f"{name}: {summary_line(mod.__doc__)}", 100,
                           subsequent_indent="  ", break_on_hyphens=False)
    for token in mod.TOKENS:
      lines += textwrap.wrap(f"{token:<11} {TOKEN_MEANINGS[token]}", 100,
                             initial_indent="    ", subsequent_indent=" " * 16,
                             break_on_hyphens=False)
  return "\n".join(lines)
