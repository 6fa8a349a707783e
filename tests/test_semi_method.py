"""Semi-DETR's method build: the by-probability batch composition against a numpy simulation
of the official sampler, its batches (sizes, stream positions, resume), the stage keys, and
`max_pseudo` sized from the labeled annotations."""
import json
import math
import os

import numpy as np
import pytest

from sized_detr_jax import config_lib
from sized_detr_jax.semi import config as semi_config
from sized_detr_jax.semi import method as semi_method
from sized_detr_jax.semi import sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "semi_detr.py")


def _official_labeled_counts(rng, batches, samples_per_gpu, sample_ratio):
  """Labeled images per GPU batch of DistributedGroupSemiBalanceSampler.__iter__ with
  by_prob=True (detr_ssod/datasets/samplers/semi_sampler.py), step by step in numpy:
  WeightedRandomSampler(ratio, samples_per_gpu, replacement=True) is `rng.choice(p=ratio)`."""
  ratios = [int(sr / min(sample_ratio)) for sr in sample_ratio]
  out = np.zeros(batches, np.int64)
  for b in range(batches):
    ratio = [x / sum(ratios) for x in ratios]
    indicator = rng.choice(len(ratio), size=samples_per_gpu, replace=True, p=ratio)
    unique, counts = np.unique(indicator, return_counts=True)
    ratio = [0] * len(ratios)
    for u, c in zip(unique, counts):
      ratio[u] = c
    if ratio[0] == 0:
      ratio[0] = 1
      ratio[1] -= 1
    elif ratio[1] == 0:
      ratio[1] = 1
      ratio[0] -= 1
    ratio = [r / sum(ratio) for r in ratio]
    ratio = [int(r * samples_per_gpu) for r in ratio]
    ratio[-1] = samples_per_gpu - sum(ratio[:-1])
    out[b] = ratio[0]
  return out


def _clamped_binomial_mean(k, p):
  pmf = [math.comb(k, i) * p**i * (1 - p)**(k - i) for i in range(k + 1)]
  return sum(i * q for i, q in enumerate(pmf)) + pmf[0] - pmf[k]


@pytest.mark.parametrize("k,ratio", [(5, (1, 4)), (8, (1, 1))])
def test_by_prob_composition_matches_the_official_sampler(k, ratio):
  n = 30000
  official = _official_labeled_counts(np.random.default_rng(1), n, k, list(ratio))
  comp = sampler.GroupComposition(seed=3, groups=8, images_per_group=k, sample_ratio=ratio)
  ours = np.array([comp.labeled_per_group(s) for s in range(n)])
  exact = _clamped_binomial_mean(k, ratio[0] / sum(ratio))
  if ratio == (1, 4):
    assert exact == pytest.approx(1.32736, abs=1e-12)  # 1.33 : 3.67 of 5
  sd = official.std()
  for counts in (official, ours):
    assert counts.min() >= 1 and counts.max() <= k - 1
    assert abs(counts.mean() - exact) < 4 * sd / math.sqrt(n)
  # The whole distribution, value by value (binomial standard errors).
  p_off = np.bincount(official, minlength=k) / n
  p_our = np.bincount(ours, minlength=k) / n
  se = np.sqrt(np.maximum(p_off * (1 - p_off), 1e-12) * 2 / n)
  assert (np.abs(p_off - p_our) < 4 * se + 1e-4).all(), (p_off, p_our)
  # The labeled share of the images over the run: official 0.265 for (1, 4) (fixed 8:32: 0.2).
  assert ours.sum() / (k * n) == pytest.approx(exact / k, abs=4 * sd / math.sqrt(n) / k)


def test_layouts_are_contiguous_stream_positions():
  comp = sampler.GroupComposition(seed=0, groups=4, images_per_group=5, sample_ratio=(1, 4))
  steps = np.arange(8300)  # crosses two draw blocks
  per_group = np.array([comp.labeled_per_group(s) for s in steps])
  before = np.concatenate([[0], np.cumsum(per_group)])
  for s in (0, 1, 7, 4095, 4096, 4097, 8191, 8192, 8299):
    count, start = comp.labeled_layout(s)
    ucount, ustart = comp.unlabeled_layout(s)
    assert count == 4 * per_group[s] and start == 4 * before[s]
    assert ucount == 4 * (5 - per_group[s]) and ustart == 4 * (5 * s - before[s])
  # Asking out of order gives the same answers (resume at any step).
  fresh = sampler.GroupComposition(seed=0, groups=4, images_per_group=5, sample_ratio=(1, 4))
  assert fresh.labeled_layout(8299) == comp.labeled_layout(8299)
  with pytest.raises(ValueError, match="sample_ratio"):
    sampler.GroupComposition(seed=0, groups=1, images_per_group=5, sample_ratio=(0, 4))
  with pytest.raises(ValueError, match="images_per_group"):
    sampler.GroupComposition(seed=0, groups=1, images_per_group=1, sample_ratio=(1, 4))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  config = config_lib.load_config(CONFIG, "smoke")
  config.data.root = str(tmp_path_factory.mktemp("semi_data") / "synthetic")
  config.data.num_threads = 1
  return config_lib.finalize(config)  # semi.switch_step from its fraction, as run.py does


def test_by_prob_batches_sizes_positions_and_resume(smoke):
  config = smoke.copy_and_resolve_references()
  # 4 groups of 3 (4 CPU devices in the tests): 4 or 8 labeled images per step.
  config.data.update(batch_size=4, unlabeled_batch_size=8)
  config.semi.update(batch_sampler="by_prob", images_per_group=3, sample_ratio=(1, 2))
  method = semi_method.build(config)
  kwargs = dict(seed=0, process_index=0, process_count=1)
  batches = method.train_batches(config.data, start_step=0, **kwargs)
  labeled_indices, unlabeled_indices, keys = [], [], set()
  steps = 10
  for s in range(steps):
    batch = next(batches)
    key = method.stage_at(s)
    keys.add(key)
    assert isinstance(key, semi_method.Stage)
    assert key.detector == (1 if s < config.semi.switch_step else 2)
    nl = batch["labeled"]["image"].shape[0]
    assert nl == 4 * key.labeled_per_group
    for view in ("weak", "strong"):
      assert batch["unlabeled"][view]["image"].shape[0] == 12 - nl
    labeled_indices += list(batch["labeled"]["image_index"])
    unlabeled_indices += list(batch["unlabeled"]["weak"]["image_index"])
    if s == 6:
      at6 = batch
  assert {k.labeled_per_group for k in keys} == {1, 2}
  # Consecutive stream positions: each epoch of each source is a permutation.
  from sized_detr_jax.data import pipeline
  for role, seen in (("train", labeled_indices), ("unlabeled", unlabeled_indices)):
    n = len(pipeline.get_source(config.data, role))
    first = seen[:n]
    assert len(set(first)) == len(first), role
  # Resume at step 6: the same batch.
  again = next(method.train_batches(config.data, start_step=6, **kwargs))
  np.testing.assert_array_equal(again["labeled"]["image"], at6["labeled"]["image"])
  np.testing.assert_array_equal(again["unlabeled"]["strong"]["image"],
                                at6["unlabeled"]["strong"]["image"])
  # Stage keys map to the detector stage's loss and evaluation.
  assert method.postprocess(semi_method.Stage(2, 1)) is method.postprocess(2)
  assert method.stage_at(10**6).detector == 2
  config.data.update(batch_size=4, unlabeled_batch_size=7)
  with pytest.raises(ValueError, match="images_per_group"):
    semi_method.build(config)


def test_fixed_sampler_keeps_int_stages(smoke):
  method = semi_method.build(smoke)
  assert method.stage_at(0) == 1 and method.stage_at(10**6) == 2


def test_max_pseudo_from_the_labeled_annotations(smoke):
  from sized_detr_jax.data import synthetic
  from sized_detr_jax.data import pipeline
  pipeline.get_source(smoke.data, "train")  # generates the dataset
  with open(synthetic.dataset_paths(smoke.data.root)["train"]["ann_file"]) as f:
    data = json.load(f)
  counts = {im["id"]: 0 for im in data["images"]}
  for ann in data["annotations"]:
    if not ann.get("iscrowd", 0) and ann["bbox"][2] > 0 and ann["bbox"][3] > 0:
      counts[ann["image_id"]] += 1
  semi = semi_config.SemiConfig(max_pseudo=0, max_detections=300)
  resolved = semi_method.resolve_max_pseudo(semi, smoke.data)
  assert resolved.max_pseudo == max(counts.values()) > 0
  capped = semi_method.resolve_max_pseudo(dataclasses_replace(semi, max_detections=2),
                                          smoke.data)
  assert capped.max_pseudo == min(2, max(counts.values()))
  assert semi_method.resolve_max_pseudo(semi_config.SemiConfig(max_pseudo=7),
                                        smoke.data).max_pseudo == 7
  with pytest.raises(ValueError, match="max_pseudo"):
    semi_config.SemiConfig(max_pseudo=-1)


def dataclasses_replace(obj, **kw):
  import dataclasses
  return dataclasses.replace(obj, **kw)
