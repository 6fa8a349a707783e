"""Semi-DETR's labeled / unlabeled batch composition with static shapes per variant.

Semi-DETR (configs/detr_ssod/base_dino_detr_ssod_coco.py: `SemiBalanceSampler`,
`sample_ratio=[1, 4]`, `by_prob=True`; detr_ssod/datasets/samplers/semi_sampler.py
`DistributedGroupSemiBalanceSampler.__iter__`) fills each GPU's batch of `samples_per_gpu`
images (5 on COCO-partial) by drawing every image's source with probability
`sample_ratio / sum(sample_ratio)` (labeled 1/5), then forces at least one image of each kind:
a batch of 0 labeled images becomes 1 : 4, one of 0 unlabeled 4 : 1. Per GPU the labeled count
L is Binomial(5, 0.2) clamped to [1, 4]: P(L = 1, 2, 3, 4) = 0.73728, 0.2048, 0.0512, 0.00672,
E[L] = 1.32736 (1.33 : 3.67 of 5, a labeled share of 0.265; the fixed 8 : 32 of a 40-image step
has 0.2).

Here a training step's global batch is `groups` such groups (8 for 8 GPUs x 5 images). The
labeled and unlabeled images are separate arrays with static shapes, sharded over the devices,
so a per-GPU composition that differs between groups of one step would need padding slots and
per-image loss masks (compute for padding, and the criterion has no per-image mask). Instead
every step draws one L from the official per-group distribution and all groups of the step
use it: the step has `groups * L` labeled and `groups * (k - L)` unlabeled images. Each group,
so each device, sees exactly the reference's distribution of L and the expected ratio is the
reference's; only the correlation between the groups of a step differs (one draw per step
instead of one per GPU). Each L is one batch shape, so one compiled step per (detector stage,
L) met: at most k - 1 = 4 per stage, compiled lazily (L = 4 has probability 0.67%). The
draws are a pure function of (seed, step), so resumed runs get the same batches.
"""
import functools
import threading

import numpy as np

_STREAM = 7  # keeps these draws independent of the pipeline's Generators
_BLOCK = 4096  # steps drawn per Generator


def official_ratio(sample_ratio):
  """The reference's labeled probability: `int(r / min(ratio))` per source, then r0 / sum."""
  ratio = [int(r / min(sample_ratio)) for r in sample_ratio]
  return ratio[0] / sum(ratio)


class GroupComposition:
  """Per-step labeled images per group, drawn as Semi-DETR's by-probability sampler.

  Attributes:
    groups: groups of `images_per_group` images in a step (the reference's GPUs).
    images_per_group: k, the reference's samples_per_gpu (>= 2).
    probability: labeled probability of one image (`official_ratio`).
  """

  def __init__(self, *, seed, groups, images_per_group, sample_ratio):
    if images_per_group < 2:
      raise ValueError(f"config.semi.images_per_group must be >= 2 (one image of each kind), "
                       f"got {images_per_group}")
    if len(sample_ratio) != 2 or min(sample_ratio) <= 0:
      raise ValueError(f"config.semi.sample_ratio must be two positive numbers (labeled, "
                       f"unlabeled), got {tuple(sample_ratio)}")
    self.seed = int(seed)
    self.groups = int(groups)
    self.images_per_group = int(images_per_group)
    self.probability = official_ratio(sample_ratio)
    self._totals = [0]  # labeled per group summed over blocks [0, i)
    self._lock = threading.Lock()

  @functools.lru_cache(maxsize=64)
  def _block(self, index):
    """int64 [BLOCK] labeled images per group of steps [index * BLOCK, (index + 1) * BLOCK)."""
    rng = np.random.default_rng([self.seed, _STREAM, index])
    k = self.images_per_group
    return np.clip(rng.binomial(k, self.probability, _BLOCK), 1, k - 1).astype(np.int64)

  def labeled_per_group(self, step):
    """L of `step` (1 .. k - 1)."""
    block, offset = divmod(int(step), _BLOCK)
    return int(self._block(block)[offset])

  def _before(self, step):
    """Sum of L over steps [0, step)."""
    block, offset = divmod(int(step), _BLOCK)
    with self._lock:
      while len(self._totals) <= block:
        self._totals.append(self._totals[-1] + int(self._block(len(self._totals) - 1).sum()))
      total = self._totals[block]
    return total + int(self._block(block)[:offset].sum())

  def labeled_layout(self, step):
    """(global labeled count, first labeled stream position) of `step`."""
    return self.groups * self.labeled_per_group(step), self.groups * self._before(step)

  def unlabeled_layout(self, step):
    """(global unlabeled count, first unlabeled stream position) of `step`."""
    k = self.images_per_group
    count = self.groups * (k - self.labeled_per_group(step))
    return count, self.groups * (k * int(step) - self._before(step))
