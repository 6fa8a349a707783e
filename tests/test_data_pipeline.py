"""Tests of the static-shape pipeline: contract shapes, exact boxes, sharding, exact resume."""
import json
import os

import numpy as np
import pytest

from sized_detr_jax.data import pipeline
from sized_detr_jax.data import synthetic
from sized_detr_jax.data import transforms as T

_KEYS = {"image": np.float32, "pixel_mask": np.bool_, "boxes": np.float32, "labels": np.int32,
         "valid": np.bool_, "image_id": np.int32, "image_index": np.int32, "orig_size": np.int32,
         "size": np.int32}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  c = pipeline.default_data_config()
  c.root = str(tmp_path_factory.mktemp("data") / "synthetic")
  c.synthetic_num_images = 24  # 24 train, 16 val, 24 unlabeled
  c.batch_size = 4
  c.unlabeled_batch_size = 4
  c.eval_batch_size = 6
  c.max_boxes = 12
  c.num_threads = 2
  return c


def _check_view_batch(batch, cfg, b, with_matrix=False):
  buckets = pipeline.buckets_from_config(cfg)
  assert set(batch) == set(_KEYS) | ({"matrix"} if with_matrix else set())
  for key, dtype in _KEYS.items():
    assert batch[key].dtype == dtype, key
  bh, bw = batch["image"].shape[1:3]
  assert (bh, bw) in buckets
  g = cfg.max_boxes
  assert batch["image"].shape == (b, bh, bw, 3) and batch["pixel_mask"].shape == (b, bh, bw)
  assert batch["boxes"].shape == (b, g, 4) and batch["labels"].shape == (b, g)
  assert batch["valid"].shape == (b, g) and batch["image_id"].shape == (b,)
  assert batch["orig_size"].shape == (b, 2) and batch["size"].shape == (b, 2)
  for k in range(b):
    h, w = batch["size"][k]
    expected_mask = np.zeros((bh, bw), bool)
    expected_mask[:h, :w] = True
    np.testing.assert_array_equal(batch["pixel_mask"][k], expected_mask)
    assert not batch["image"][k][~expected_mask].any()  # zero padding
  v = batch["valid"]
  assert (batch["boxes"][v] > 0).all() and (batch["boxes"][v] <= 1).all()
  assert not batch["boxes"][~v].any()
  assert ((batch["labels"][v] >= 0) & (batch["labels"][v] < 4)).all()


def test_buckets_and_dataset_info(cfg):
  assert pipeline.buckets_from_config(cfg) == [(256, 384), (384, 256), (384, 384)]
  assert pipeline.buckets_from_config(pipeline.coco_data_config()) == [
      (800, 1344), (1344, 800), (1344, 1344)]
  assert pipeline.choose_bucket([(256, 384), (384, 256), (384, 384)], [(200, 300), (250, 380)]
                                ) == (256, 384)
  assert pipeline.choose_bucket([(256, 384), (384, 256), (384, 384)], [(200, 300), (300, 200)]
                                ) == (384, 384)
  with pytest.raises(ValueError, match="no bucket holds a view of 400x10"):
    pipeline.choose_bucket([(256, 384)], [(400, 10)])
  info = pipeline.dataset_info(cfg)
  assert info["num_classes"] == 4 and info["num_train"] == 24 and info["num_val"] == 16
  assert info["val_gt_json"].endswith("instances_val.json")
  np.testing.assert_array_equal(info["category_ids"], [1, 2, 3, 4])


def test_train_batches_static_shapes_and_resume(cfg):
  it = pipeline.build_train_iterator(cfg, seed=7)
  first = [next(it) for _ in range(3)]
  for batch in first:
    _check_view_batch(batch, cfg, 4)
  state = it.get_state()
  assert int(state["step"]) == 3
  after = [next(it) for _ in range(2)]
  resumed = pipeline.build_train_iterator(cfg, seed=7)
  resumed.set_state(state)
  started = pipeline.build_train_iterator(cfg, seed=7, start_step=3)
  for other in (resumed, started):
    for expected in after:
      got = next(other)
      for key in _KEYS:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  other_seed = next(pipeline.build_train_iterator(cfg, seed=8))
  assert not np.array_equal(other_seed["image_id"], first[0]["image_id"]) or not np.array_equal(
      other_seed["size"], first[0]["size"])


def test_two_processes_read_disjoint_covering_shards(cfg):
  whole = pipeline.make_train_batch_fn(pipeline.get_source(cfg, "train"), cfg, seed=1)
  parts = [pipeline.make_train_batch_fn(pipeline.get_source(cfg, "train"), cfg, seed=1,
                                        process_index=k, process_count=2) for k in (0, 1)]
  ids = [[], []]
  steps_per_epoch = 24 // 4
  for step in range(steps_per_epoch):
    halves = [fn(step) for fn in parts]
    for k in (0, 1):
      _check_view_batch(halves[k], cfg, 2)
      ids[k].extend(halves[k]["image_id"].tolist())
    if step < 2:  # the two halves are exactly the single-process batch
      full = whole(step)
      for key in _KEYS:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key])
  train_ids = json.load(open(synthetic.dataset_paths(cfg.root)["train"]["ann_file"]))["images"]
  assert not set(ids[0]) & set(ids[1])
  assert sorted(ids[0] + ids[1]) == sorted(im["id"] for im in train_ids)


def test_eval_batches_cover_val_once_with_padding_and_exact_boxes(cfg):
  paths = synthetic.dataset_paths(cfg.root)["val"]
  gt = json.load(open(paths["ann_file"]))
  images = {im["id"]: im for im in gt["images"]}
  seen = []
  for k in (0, 1):
    it, gt_json = pipeline.build_eval_iterator(cfg, process_index=k, process_count=2)
    assert gt_json == paths["ann_file"] and len(it) == 3  # ceil(16 / 6)
    for batch in it:
      _check_view_batch(batch, cfg, 3)
      for j in range(3):
        image_id = int(batch["image_id"][j])
        seen.append(image_id)
        if image_id < 0:
          continue
        # Independent float64 re-derivation: eval resize factor s, boxes / size as cxcywh.
        im = images[image_id]
        h, w = im["height"], im["width"]
        short, long = min(h, w), max(h, w)
        size = 224 if long / short * 224 <= 384 else round(384 * short / long)
        oh, ow = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        oh, ow = min(oh, 384), min(ow, 384)
        np.testing.assert_array_equal(batch["size"][j], [oh, ow])
        np.testing.assert_array_equal(batch["orig_size"][j], [h, w])
        anns = [a["bbox"] for a in gt["annotations"] if a["image_id"] == image_id]
        xywh = np.array(anns, np.float64)[:cfg.max_boxes]
        sx, sy = ow / w, oh / h
        expected = np.stack([(xywh[:, 0] + xywh[:, 2] / 2) * sx / ow,
                             (xywh[:, 1] + xywh[:, 3] / 2) * sy / oh,
                             xywh[:, 2] * sx / ow, xywh[:, 3] * sy / oh], -1)
        v = batch["valid"][j]
        assert v.sum() == len(expected)
        np.testing.assert_allclose(batch["boxes"][j][v], expected, rtol=1e-5, atol=1e-6)
  assert seen.count(-1) == 2
  assert sorted(i for i in seen if i >= 0) == sorted(images)



def test_periodic_eval_parses_annotations_once_per_file_version(cfg, tmp_path, monkeypatch):
  # The trainer asks for the eval iterator (and dataset_info) at every periodic evaluation: the
  # annotation jsons and the dataset marker must be parsed once, and again only when rewritten.
  import shutil
  pipeline.dataset_info(cfg)  # the fixture's dataset exists
  c = cfg.copy_and_resolve_references()
  c.root = str(tmp_path / "synthetic")
  shutil.copytree(cfg.root, c.root)
  loads = []
  real_load = json.load

  def counting_load(f, *args, **kwargs):
    loads.append(os.path.basename(f.name))
    return real_load(f, *args, **kwargs)

  monkeypatch.setattr(json, "load", counting_load)
  pipeline.dataset_info(c)
  pipeline.build_eval_iterator(c)
  assert sorted(set(loads)) == ["DONE.json", "instances_train.json", "instances_val.json"]
  assert loads.count("instances_train.json") == loads.count("instances_val.json") == 1
  loads.clear()
  for _ in range(3):
    _, gt_json = pipeline.build_eval_iterator(c)
    pipeline.dataset_info(c)
  assert loads == [] and gt_json == synthetic.dataset_paths(c.root)["val"]["ann_file"]
  # Rewriting the val json (one image fewer) is seen on the next call, and only it is re-read.
  gt = real_load(open(gt_json))
  dropped = gt["images"].pop()["id"]
  gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != dropped]
  with open(gt_json, "w") as f:
    json.dump(gt, f)
  it, _ = pipeline.build_eval_iterator(c)
  assert loads == ["instances_val.json"]
  assert pipeline.dataset_info(c)["num_val"] == 15 and len(it) == 3  # ceil(15 / 6)
  assert dropped not in {int(i) for batch in it for i in batch["image_id"]}

def test_unlabeled_weak_strong_views_and_box_mapping(cfg):
  # The synthetic unlabeled split has no boxes: use the train json as the unlabeled role to
  # check that the recorded matrices map weak-view boxes onto strong-view boxes.
  c = cfg.copy_and_resolve_references()
  paths = synthetic.dataset_paths(cfg.root)
  c.source = "coco"
  c.train_ann, c.train_images = paths["train"]["ann_file"], paths["train"]["image_dir"]
  c.val_ann, c.val_images = paths["val"]["ann_file"], paths["val"]["image_dir"]
  c.unlabeled_ann, c.unlabeled_images = c.train_ann, c.train_images
  it = pipeline.build_unlabeled_iterator(c, seed=3)
  compared = 0
  for _ in range(3):
    batch = next(it)
    assert set(batch) == {"weak", "strong"}
    weak, strong = batch["weak"], batch["strong"]
    _check_view_batch(weak, c, 4, with_matrix=True)
    _check_view_batch(strong, c, 4, with_matrix=True)
    np.testing.assert_array_equal(weak["image_id"], strong["image_id"])
    for k in range(4):
      # When no box left the strong view, boxes correspond one to one.
      if weak["valid"][k].sum() == strong["valid"][k].sum():
        mapped = T.map_boxes_between_views(
            weak["boxes"][k][weak["valid"][k]], weak["matrix"][k].astype(np.float64),
            strong["matrix"][k].astype(np.float64), weak["size"][k].astype(np.float64),
            strong["size"][k].astype(np.float64))
        np.testing.assert_allclose(mapped, strong["boxes"][k][strong["valid"][k]], atol=1e-4)
        compared += 1
  assert compared >= 4
  state = it.get_state()
  nxt = next(it)
  again = pipeline.build_unlabeled_iterator(c, seed=3, start_step=int(state["step"]))
  np.testing.assert_array_equal(next(again)["strong"]["image"], nxt["strong"]["image"])
  # The synthetic unlabeled split itself: images, no boxes.
  plain = next(pipeline.build_unlabeled_iterator(cfg, seed=3))
  assert not plain["weak"]["valid"].any() and plain["strong"]["pixel_mask"].any()


def test_unknown_sizes_use_largest_bucket_and_bad_args(cfg):
  class NoSizes:
    def __init__(self, src):
      self.src = src

    def __len__(self):
      return len(self.src)

    def __getitem__(self, i):
      return self.src[i]

    def image_sizes(self):
      return None

  src = pipeline.get_source(cfg, "train")
  batch = pipeline.make_train_batch_fn(NoSizes(src), cfg, seed=0)(0)
  assert batch["image"].shape[1:3] == (384, 384)
  reference = pipeline.make_train_batch_fn(src, cfg, seed=0)(0)
  np.testing.assert_array_equal(batch["boxes"], reference["boxes"])
  with pytest.raises(ValueError, match="not divisible by process_count 3"):
    pipeline.make_train_batch_fn(src, cfg, seed=0, process_index=0, process_count=3)
  bad = cfg.copy_and_resolve_references()
  bad.source = "nope"
  with pytest.raises(ValueError, match="config.data.source must be"):
    pipeline.get_source(bad, "train")


def test_uint8_batches_normalised_on_device_match_host_path(cfg):
  c = cfg.copy_and_resolve_references()
  c.host_normalize = False
  src = pipeline.get_source(cfg, "train")
  raw = pipeline.make_train_batch_fn(src, c, seed=2)(1)
  host = pipeline.make_train_batch_fn(src, cfg, seed=2)(1)
  assert raw["image"].dtype == np.uint8
  np.testing.assert_allclose(np.asarray(T.normalize_image_jax(raw["image"], raw["pixel_mask"])),
                             host["image"], atol=1e-5)
  np.testing.assert_array_equal(raw["boxes"], host["boxes"])


def test_config_resolution():
  partial = pipeline.resolve_data_config({"batch_size": 8, "scales": [480, 512]})
  assert partial.batch_size == 8 and tuple(partial.scales) == (480, 512)
  assert partial.max_boxes == pipeline.default_data_config().max_boxes
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['batchsize'\]"):
    pipeline.resolve_data_config({"batchsize": 8})


_MULTIPROCESS_SCRIPT = r"""
import os, sys
os.environ["JAX_NUM_CPU_DEVICES"] = "2"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)
import jax
import numpy as np
from jax.experimental import multihost_utils
jax.distributed.initialize(f"localhost:{sys.argv[2]}", 2, int(sys.argv[1]))
from sized_detr_jax.data import pipeline
cfg = pipeline.default_data_config()
cfg.root, cfg.synthetic_num_images, cfg.batch_size = sys.argv[3], 24, 4
it = pipeline.build_train_iterator(cfg, seed=0, process_index=jax.process_index(),
                                   process_count=jax.process_count())
sharding = jax.sharding.NamedSharding(jax.make_mesh((4,), ("data",)), jax.P("data"))
whole = pipeline.make_train_batch_fn(pipeline.get_source(cfg, "train"), cfg, seed=0)
for step in range(2):
  batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), next(it))
  for key in ("image_id", "boxes", "image"):
    got = multihost_utils.process_allgather(batch[key], tiled=True)
    np.testing.assert_array_equal(np.asarray(got), whole(step)[key])
print("ok", jax.process_index())
"""


@pytest.mark.slow
def test_two_real_jax_processes_assemble_the_single_process_global_batch(cfg, tmp_path):
  # Multi-host path on one machine (docs/operations.md, multi-host): both processes pick the same bucket
  # without communicating, and their local batches form exactly the single-process batch.
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  script = tmp_path / "mp.py"
  script.write_text(_MULTIPROCESS_SCRIPT)
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  procs = [subprocess.Popen([sys.executable, str(script), str(k), str(port), cfg.root], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for k in (0, 1)]
  outs = [p.communicate(timeout=120) for p in procs]
  for k, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"ok {k}" in out, err[-2000:]
