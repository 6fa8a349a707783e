"""Fault matrix (issue 14, "nothing lost"): corrupt / mismatching / non-finite checkpoints, a full
disk during a save, odd image modes, bad splits, bad configs and flags.

Each test asserts the error (type and message text) and that nothing was lost: checkpoint steps
present with their exact values, images equal to a float64 reference, files left in place.
Library functions are called directly on tiny inputs; the run.py flag cases start a subprocess
that fails before JAX compiles anything.
"""
import errno
import glob
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax import checkpointing

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------- checkpoints
def _state(offset=0.0, hidden=8):
  """A train-state-like pytree: params, optimiser moments, an int step and a uint32 rng."""
  w = jnp.arange(64 * hidden, dtype=jnp.float32).reshape(64, hidden) + offset
  return {"step": jnp.asarray(int(offset), jnp.int32),
          "params": {"head": {"kernel": w, "bias": jnp.full((hidden,), offset, jnp.float32)}},
          "opt_state": {"mu": {"head": {"kernel": w * 0.5}}, "count": jnp.asarray(3, jnp.int32)},
          "rng": jnp.asarray([1, 2], jnp.uint32)}


def _saved(tmp_path, steps=(2, 4), **kw):
  ckpt = checkpointing.Checkpointer(str(tmp_path), every=2, keep=5, async_save=False, **kw)
  for step in steps:
    assert ckpt.maybe_save(step, _state(step), {"step": step})
  ckpt.wait()
  return ckpt


def _assert_state_equal(restored, expected):
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _truncate(path, size=0):
  with open(path, "r+b") as f:
    f.truncate(size)


def _largest_data_file(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


# Each damages step 4 the way a killed copy / bad disk would; orbax raises a bare Exception, a
# ValueError (DATA_LOSS) or a JSONDecodeError for these.
CORRUPTIONS = {
    "truncated_array_data": lambda d: _truncate(_largest_data_file(d), 10),
    "truncated_tree_metadata": lambda d: _truncate(os.path.join(d, "state", "_METADATA"), 20),
    "garbage_manifest": lambda d: open(os.path.join(d, "state", "manifest.ocdbt"), "wb").write(
        b"not a manifest"),
    "truncated_meta_json": lambda d: _truncate(os.path.join(d, "meta", "metadata"), 3),
    "state_folder_missing": lambda d: shutil.rmtree(os.path.join(d, "state")),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_case1_corrupt_newest_step_is_moved_aside_restore_falls_back_and_step_saves_again(
    tmp_path, corruption):
  ckpt = _saved(tmp_path)
  abstract = checkpointing.abstract_like(_state())
  ckpt.close()
  CORRUPTIONS[corruption](os.path.join(ckpt.directory, "4"))

  ckpt = checkpointing.Checkpointer(str(tmp_path), every=2, keep=5, async_save=False)
  result = ckpt.restore(abstract)
  assert result.step == 2 and result.meta == {"step": 2}
  _assert_state_equal(result.state, _state(2))
  (skipped,) = result.skipped
  assert skipped.step == 4
  assert re.fullmatch(r"4\.corrupt-\d{8}T\d{6}", os.path.basename(skipped.moved_to))
  assert os.path.isdir(skipped.moved_to)  # kept for inspection, never deleted
  assert re.match(r"step 2 because step 4 was unreadable \(.+\); moved to .*4\.corrupt-",
                  result.describe())
  assert ckpt.complete_steps() == [2]
  # The retrained step 4 is saved again under its number (before the fix: silently skipped).
  assert ckpt.maybe_save(4, _state(40), {"step": 4})
  ckpt.close()
  ckpt = checkpointing.Checkpointer(str(tmp_path), every=2, keep=5, async_save=False)
  result = ckpt.restore(abstract)
  assert (result.step, result.skipped) == (4, ())
  _assert_state_equal(result.state, _state(40))
  assert os.path.isdir(skipped.moved_to)  # orbax neither lists nor cleans the renamed folder
  ckpt.close()


def test_case1_every_step_corrupt_restores_nothing_and_says_why(tmp_path):
  ckpt = _saved(tmp_path)
  ckpt.close()
  for step in (2, 4):
    _truncate(os.path.join(ckpt.directory, str(step), "state", "_METADATA"), 5)
  ckpt = checkpointing.Checkpointer(str(tmp_path), every=2, async_save=False)
  result = ckpt.restore(checkpointing.abstract_like(_state()))
  assert result.step is None and [s.step for s in result.skipped] == [4, 2]
  assert result.describe().startswith("no checkpoint restored because step 4 was unreadable")
  assert ckpt.restore_latest(checkpointing.abstract_like(_state())) is None
  assert len(glob.glob(os.path.join(ckpt.directory, "*.corrupt-*"))) == 2
  ckpt.close()


@pytest.mark.parametrize("wanted, message", [
    (_state(hidden=4), r"params/head/bias has shape \(8,\) in the checkpoint but \(4,\) in the "
                       r"config's state"),
    ({**_state(), "ema_params": {"w": jnp.zeros((2,))}},
     r"ema_params/w \(shape \(2,\)\) is in the config's state but not in the checkpoint"),
    ({k: v for k, v in _state().items() if k != "opt_state"},
     r"opt_state/count \(shape \(\)\) is in the checkpoint but not in the config's state"),
])
def test_case2_checkpoint_of_another_model_is_an_error_naming_path_and_shapes(
    tmp_path, wanted, message):
  import ml_collections  # pylint: disable=g-import-not-at-top
  ckpt = _saved(tmp_path)
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    json.dump({"model": {"hidden_dim": 64, "num_queries": 30}, "seed": 0}, f)
  config = ml_collections.ConfigDict({"model": {"hidden_dim": 32, "num_queries": 30}, "seed": 0})
  with pytest.raises(checkpointing.CheckpointMismatchError, match=message) as info:
    ckpt.restore(checkpointing.abstract_like(wanted), config=config)
  text = str(info.value)
  assert "checkpoint step 4 in" in text and "model.hidden_dim: 64 -> 32" in text
  assert "num_queries" not in text and "\n" not in text
  assert isinstance(info.value, ValueError)  # run.py prints ValueErrors as one line
  # Nothing moved or deleted; the matching config still restores step 4.
  assert ckpt.complete_steps() == [2, 4] and not glob.glob(os.path.join(ckpt.directory, "*-*"))
  result = ckpt.restore(checkpointing.abstract_like(_state()))
  assert result.step == 4
  _assert_state_equal(result.state, _state(4))
  ckpt.close()


def test_case2_fresh_start_moves_every_step_aside_and_saves_anew(tmp_path):
  ckpt = _saved(tmp_path)
  result = result_old = ckpt.restore(checkpointing.abstract_like(_state(hidden=4)),
                                     on_mismatch="fresh")
  assert result.step is None and result.state is None
  assert sorted(os.path.basename(p).split(".")[0] for p in result.superseded) == ["2", "4"]
  assert all(re.fullmatch(r"\d\.superseded-\d{8}T\d{6}", os.path.basename(p))
             for p in result.superseded)
  assert "fresh start requested" in result.describe()
  assert ckpt.complete_steps() == []
  assert ckpt.maybe_save(2, _state(7, hidden=4), {"step": 2})  # the new model's step 2
  ckpt.close()
  ckpt = checkpointing.Checkpointer(str(tmp_path), every=2, async_save=False)
  result = ckpt.restore(checkpointing.abstract_like(_state(hidden=4)))
  assert result.step == 2
  _assert_state_equal(result.state, _state(7, hidden=4))
  with pytest.raises(ValueError, match="on_mismatch must be one of"):
    ckpt.restore(checkpointing.abstract_like(_state()), on_mismatch="ignore")
  ckpt.close()
  # The old model's step 4 survives intact in its renamed folder: copied back, it restores.
  old4 = next(p for p in result_old.superseded if os.path.basename(p).startswith("4."))
  shutil.copytree(old4, tmp_path / "copy" / "checkpoints" / "4")
  old = checkpointing.Checkpointer(str(tmp_path / "copy"), every=2, async_save=False)
  _assert_state_equal(old.restore(checkpointing.abstract_like(_state())).state, _state(4))
  old.close()


@pytest.mark.parametrize("where, value", [("params", np.nan), ("opt_state", np.inf)])
def test_case5_non_finite_state_is_never_saved(tmp_path, where, value):
  ckpt = _saved(tmp_path, steps=(2,))
  bad = _state(4)
  leaf = bad[where]["head"]["kernel"] if where == "params" else bad[where]["mu"]["head"]["kernel"]
  poisoned = leaf.at[3, 1].set(value).at[5, 0].set(value)
  if where == "params":
    bad["params"]["head"]["kernel"] = poisoned
  else:
    bad["opt_state"]["mu"]["head"]["kernel"] = poisoned
  path = "params/head/kernel" if where == "params" else "opt_state/mu/head/kernel"
  with pytest.raises(checkpointing.NonFiniteStateError,
                     match=rf"refusing to save the checkpoint of step 4: {path} holds 2 "
                           rf"non-finite value\(s\) of 512; the newest checkpoint on disk, "
                           rf"step 2 \(.*checkpoints/2\), is kept"):
    ckpt.maybe_save(4, bad, {"step": 4})
  assert ckpt.complete_steps() == [2]
  result = ckpt.restore(checkpointing.abstract_like(_state()))
  assert result.step == 2
  _assert_state_equal(result.state, _state(2))
  ckpt.close()
  empty = checkpointing.Checkpointer(str(tmp_path / "fresh"), every=1, async_save=False)
  with pytest.raises(checkpointing.NonFiniteStateError,
                     match=r"step 1: .* there is no checkpoint in .*fresh/checkpoints yet$"):
    empty.maybe_save(1, bad, {"step": 1})
  assert empty.complete_steps() == []
  empty.close()


def test_first_non_finite_reference():
  tree = {"a": np.zeros(3, np.float32), "b": {"c": np.array([1, 2]), "d": np.array(
      [0.0, -np.inf, np.nan, 1.0], np.float16)}}
  assert checkpointing.first_non_finite(tree) == ("b/d", 2, 4)
  tree["b"]["d"] = np.ones(4, np.float16)
  assert checkpointing.first_non_finite(tree) is None


def test_full_disk_during_save_keeps_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
  from orbax.checkpoint._src.serialization import serialization  # pylint: disable=g-import-not-at-top
  ckpt = _saved(tmp_path, steps=(2,))
  real, calls = serialization.async_serialize_from_host, []

  async def fill_disk_after_first_array(*args, **kwargs):
    calls.append(1)
    if len(calls) > 1:  # the first array is written, then the disk is full
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return await real(*args, **kwargs)

  monkeypatch.setattr(serialization, "async_serialize_from_host", fill_disk_after_first_array)
  with pytest.raises(checkpointing.CheckpointSaveError,
                     match=r"saving the checkpoint of step 4 to .*checkpoints failed \(.*No space "
                           r"left on device.*\); the newest checkpoint on disk, step 2 .*, is "
                           r"intact"):
    ckpt.maybe_save(4, _state(4), {"step": 4})
  assert len(calls) >= 2
  monkeypatch.undo()
  assert ckpt.complete_steps() == [2]
  assert os.listdir(ckpt.directory) == ["2"]  # the partial temporary folder is gone
  ckpt.close()
  ckpt = checkpointing.Checkpointer(str(tmp_path), every=2, async_save=False)
  result = ckpt.restore(checkpointing.abstract_like(_state()))
  assert result.step == 2
  _assert_state_equal(result.state, _state(2))
  assert ckpt.maybe_save(4, _state(4), {"step": 4})  # space freed: the save works again
  ckpt.close()


def test_full_disk_during_async_save_surfaces_at_wait(tmp_path, monkeypatch):
  from orbax.checkpoint._src.serialization import serialization  # pylint: disable=g-import-not-at-top
  ckpt = checkpointing.Checkpointer(str(tmp_path), every=2, async_save=True)
  assert ckpt.maybe_save(2, _state(2), {"step": 2})
  ckpt.wait()

  async def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(serialization, "async_serialize_from_host", full)
  try:
    ckpt.maybe_save(4, _state(4), {"step": 4})
  except checkpointing.CheckpointSaveError:
    pass  # raised at once on some orbax versions; otherwise at the next wait
  else:
    with pytest.raises(checkpointing.CheckpointSaveError,
                       match=r"step 4 .*No space left on device.*newest checkpoint on disk, "
                             r"step 2"):
      ckpt.wait()
  monkeypatch.undo()
  assert ckpt.complete_steps() == [2]
  ckpt.close()


# ------------------------------------------------------------------------------- images (case 3)
def _png16_rgb(path, rgb):
  """Writes a 16-bit-per-channel RGB PNG (Pillow cannot write one) from uint16 [H, W, 3]."""
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top

  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  h, w, _ = rgb.shape
  raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


_H, _W = 32, 48


def _gray16():
  v = np.random.default_rng(0).integers(0, 65536, size=(_H, _W)).astype(np.uint16)
  v[0, :6] = [0, 255, 256, 257, 65279, 65535]  # edges of the >> 8 buckets
  return v


def _odd_images(folder):
  """{name: (path, float64 reference uint8 gray [H, W] or RGB [H, W, 3])} written with PIL."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  v = _gray16()
  f64 = v.astype(np.float64)
  out = {}
  path = os.path.join(folder, "gray16.png")
  Image.fromarray(v).save(path)  # PNG bit depth 16, opened as mode I;16
  assert Image.open(path).mode == "I;16"
  out["I;16 png"] = (path, np.floor(f64 / 256.0))  # the high byte
  rgb = np.stack([v, v[::-1], 65535 - v], axis=-1)
  path = os.path.join(folder, "rgb16.png")
  _png16_rgb(path, rgb)
  out["RGB 16-bit png"] = (path, np.floor(rgb.astype(np.float64) / 256.0))  # Pillow's decoder
  path = os.path.join(folder, "int32.tif")
  Image.fromarray(v.astype(np.int32)).save(path)
  assert Image.open(path).mode == "I"
  out["I tif 16-bit values"] = (path, np.floor(f64 / 256.0))
  small = (v % 256).astype(np.int32)
  path = os.path.join(folder, "int32_8bit.tif")
  Image.fromarray(small).save(path)
  out["I tif 8-bit values"] = (path, small.astype(np.float64))
  unit = (f64 / 65535.0).astype(np.float32)
  path = os.path.join(folder, "float01.tif")
  Image.fromarray(unit).save(path)
  assert Image.open(path).mode == "F"
  out["F tif [0, 1]"] = (path, np.floor(unit.astype(np.float64) * 255.0 + 0.5))
  scaled = (f64 / 65535.0 * 255.0).astype(np.float32)
  path = os.path.join(folder, "float255.tif")
  Image.fromarray(scaled).save(path)
  out["F tif [0, 255]"] = (path, np.floor(scaled.astype(np.float64) + 0.5))
  return out


def test_case3_16bit_int_and_float_images_scale_to_8_bits_in_every_loader(tmp_path):
  from sized_detr_jax.data import coco  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.data import image_files  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  images = _odd_images(str(tmp_path))
  refs = {}
  for name, (path, ref) in images.items():
    ref = np.repeat(ref[..., None], 3, axis=-1) if ref.ndim == 2 else ref
    refs[path] = ref
    decoded = coco.decode_image(path)
    assert decoded.dtype == np.uint8 and decoded.shape == (_H, _W, 3), name
    np.testing.assert_array_equal(decoded, ref, err_msg=name)
    assert (decoded < 255).mean() > 0.9, name  # before: convert("RGB") clipped to white
  paths = sorted(refs)
  # Prediction (image files) and training / evaluation (COCO json) go through decode_image.
  gt = {"images": [{"id": 10 + i, "file_name": os.path.basename(p), "height": _H, "width": _W}
                   for i, p in enumerate(paths)],
        "annotations": [{"id": 1, "image_id": 10, "category_id": 1, "bbox": [2, 3, 10, 12],
                         "area": 120.0, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}]}
  ann = tmp_path / "gt.json"
  ann.write_text(json.dumps(gt))
  cfg = pipeline.default_data_config()
  cfg.update(dict(source="coco", eval_size=_H, eval_max_size=_W, scales=(_H,), max_size=_W,
                  random_crop=False, hflip_prob=0.0, buckets=((_H, _W),), eval_batch_size=2,
                  batch_size=2, host_normalize=False))
  sources = {"predict": image_files.ImageFilesSource(paths),
             "eval": coco.CocoSource(str(ann), str(tmp_path))}
  for role, source in sources.items():
    for i, path in enumerate(paths):
      np.testing.assert_array_equal(source[i]["image"], refs[path], err_msg=f"{role} {path}")
    batch_fn = pipeline.make_eval_batch_fn(source, cfg)
    for step in range(len(paths) // 2):
      batch = batch_fn(step)
      for k, index in enumerate(batch["image_index"]):  # identity geometry: exact pixels
        np.testing.assert_array_equal(batch["image"][k, :_H, :_W], refs[paths[index]])
  train = pipeline.make_train_batch_fn(sources["eval"], cfg, seed=0)(0)
  for k, index in enumerate(train["image_index"]):
    np.testing.assert_array_equal(train["image"][k, :_H, :_W], refs[paths[index]])


# ------------------------------------------------------------------------ COCO-partial (case 8)
def _tiny_coco(n, ids=None):
  ids = list(range(1, n + 1)) if ids is None else ids
  return {"images": [{"id": i, "file_name": f"{i}.png", "height": _H, "width": _W} for i in ids],
          "annotations": [{"id": k + 1, "image_id": i, "category_id": 1,
                           "bbox": [2.0 + k, 3.0, 10.0 + k, 12.0]} for k, i in enumerate(ids)],
          "categories": [{"id": 1, "name": "thing"}]}


def test_case8_empty_labeled_split_is_an_error_naming_percent_and_count(tmp_path, capsys):
  from sized_detr_jax.data import coco_partial  # pylint: disable=g-import-not-at-top
  ann = tmp_path / "four.json"
  ann.write_text(json.dumps(_tiny_coco(4)))
  out = tmp_path / "out"
  assert coco_partial.main(["--ann", str(ann), "--percent", "10", "--fold", "1",
                            "--out", str(out)]) == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err
  assert re.search(r"--percent 10 of 4 images gives int\(10 / 100 x 4\) = 0 labeled images, an "
                   r"empty labeled split; use --percent >= 25 or --min-labeled 1", err), err
  assert not out.exists()  # nothing written
  # The minimum by flag: 1 labeled image, 3 unlabeled, a partition of the 4.
  assert coco_partial.main(["--ann", str(ann), "--percent", "10", "--fold", "1",
                            "--out", str(out), "--min-labeled", "1"]) == 0
  lab, unl = (json.load(open(p)) for p in coco_partial.split_paths(str(ann), 10, 1, str(out)))
  assert len(lab["images"]) == 1 and len(unl["images"]) == 3
  assert sorted(im["id"] for im in lab["images"] + unl["images"]) == [1, 2, 3, 4]
  with pytest.raises(coco_partial.SplitError, match="labels all 4 images: the unlabeled split "
                                                    "would be empty"):
    coco_partial.split_coco(_tiny_coco(4), 10, 1, min_labeled=4)
  lab, unl = coco_partial.split_coco(_tiny_coco(4), 100, 1)  # COCO-full: no unlabeled part
  assert len(lab["images"]) == 4 and unl["images"] == []


# ----------------------------------------------------------------------- COCO "area" (case 9)
def _write_images(folder, ids):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for i in ids:
    Image.fromarray(np.full((_H, _W, 3), 40 * (i % 5), np.uint8)).save(
        os.path.join(folder, f"{i}.png"))


def _perfect_detections(gt):
  return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
           "score": 0.9} for a in gt["annotations"]]


def test_case9_json_without_area_and_iscrowd_is_evaluated_with_filled_copy(tmp_path):
  from sized_detr_jax import evaluate  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  gt = _tiny_coco(3)  # no "area", no "iscrowd" (allowed by the COCO loader)
  ann = tmp_path / "val.json"
  ann.write_text(json.dumps(gt))
  original = ann.read_bytes()
  _write_images(str(tmp_path), [1, 2, 3])
  with pytest.raises(KeyError):  # what pycocotools does with the original (before: after training)
    evaluate.coco_metrics(str(ann), _perfect_detections(gt))
  cfg = pipeline.default_data_config()
  cfg.update(dict(source="coco", train_ann=str(ann), train_images=str(tmp_path),
                  val_ann=str(ann), val_images=str(tmp_path), gt_cache_dir=str(tmp_path / "gt")))
  info = pipeline.dataset_info(cfg)
  _, eval_gt = pipeline.build_eval_iterator(cfg)
  assert info["val_gt_json"] == eval_gt != str(ann)
  filled = json.load(open(eval_gt))
  for a, b in zip(filled["annotations"], gt["annotations"]):
    assert a["area"] == float(np.float64(b["bbox"][2]) * np.float64(b["bbox"][3]))
    assert a["iscrowd"] == 0 and a["bbox"] == b["bbox"]
  metrics, _ = evaluate.coco_metrics(eval_gt, _perfect_detections(gt))
  assert metrics["AP"] == pytest.approx(1.0)
  assert ann.read_bytes() == original  # the user's file is never rewritten


# ------------------------------------------------------------------ image ids >= 2**31 (case 11)
def test_case11_image_ids_beyond_int32_map_back_exactly(tmp_path):
  from sized_detr_jax import evaluate  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.data import coco  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  ids = [2**31 + 5, 2**40 + 1, 7]
  gt = _tiny_coco(3, ids)
  for a in gt["annotations"]:
    a.update(area=a["bbox"][2] * a["bbox"][3], iscrowd=0)
  ann = tmp_path / "big.json"
  ann.write_text(json.dumps(gt))
  _write_images(str(tmp_path), ids)
  source = coco.CocoSource(str(ann), str(tmp_path))
  assert source.image_ids.dtype == np.int64 and source.image_ids.tolist() == ids
  cfg = pipeline.default_data_config()
  cfg.update(dict(eval_size=_H, eval_max_size=_W, buckets=((_H, _W),), eval_batch_size=4))
  # The int32 device field cannot hold them: a clear error, not an OverflowError.
  with pytest.raises(ValueError, match=r"image id 2147483653 \(source position 0\) does not fit "
                                       r"the int32 batch field 'image_id'.*with_image_id=False"):
    pipeline.make_eval_batch_fn(source, cfg)(0)
  batch = pipeline.make_eval_batch_fn(source, cfg, with_image_id=False)(0)
  assert "image_id" not in batch and batch["image_index"].dtype == np.int32
  assert batch["image_index"].tolist() == [0, 1, 2, -1]  # -1: padding of the last batch
  mapped = pipeline.image_ids_of(source, batch["image_index"])
  assert mapped.dtype == np.int64 and mapped.tolist() == ids + [-1]
  # Detections written with the mapped ids score against the ground truth exactly.
  boxes = np.zeros((4, 1, 4))
  for k, a in enumerate(gt["annotations"]):
    boxes[k, 0] = a["bbox"]
  dets = evaluate.detections_to_coco(mapped, np.full((4, 1), 0.9), np.zeros((4, 1), int), boxes,
                                     [1])
  assert sorted(d["image_id"] for d in dets) == sorted(ids)
  assert evaluate.coco_metrics(str(ann), dets)[0]["AP"] == pytest.approx(1.0)
  train = pipeline.make_train_batch_fn(source, {**cfg.to_dict(), "batch_size": 2,
                                                "scales": (_H,), "max_size": _W,
                                                "random_crop": False}, seed=0,
                                       with_image_id=False)(0)
  assert set(pipeline.image_ids_of(source, train["image_index"]).tolist()) <= set(ids)


# -------------------------------------------------------------- synthetic dataset root (case 10)
_SYN = dict(num_images=2, seed=5, num_val=1, num_unlabeled=1)


def _mtimes(root):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(root) for f in files if f != "DONE.json"}


def test_case10_cli_dataset_is_used_as_is_by_the_trainer_data_path(tmp_path):
  from sized_detr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / "by_hand")
  # docs/custom_data.md's "generate by hand" step, then the trainer's data path on that root.
  assert synthetic.main(["--out", root, "--num-images", "2", "--seed", "5", "--num-val", "1",
                         "--num-unlabeled", "1"]) == 0
  before = _mtimes(root)
  cfg = pipeline.default_data_config()
  cfg.update(dict(root=root, synthetic_num_images=2, synthetic_seed=5, synthetic_num_val=1,
                  synthetic_num_unlabeled=1))
  assert pipeline.dataset_info(cfg)["num_train"] == 2
  assert _mtimes(root) == before  # used as is, nothing regenerated
  assert synthetic.main(["--out", root, "--num-images", "2", "--seed", "5", "--num-val", "1",
                         "--num-unlabeled", "1"]) == 0  # rerunning the CLI keeps it too
  assert _mtimes(root) == before


def test_case10_dataset_without_marker_is_adopted_when_complete(tmp_path):
  from sized_detr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / "old")
  synthetic.make_synthetic_dataset(root, **_SYN)  # as the CLI wrote it before: no DONE.json
  before = _mtimes(root)
  paths = synthetic.ensure_synthetic_dataset(root, **_SYN)
  assert os.path.isfile(os.path.join(root, "DONE.json")) and _mtimes(root) == before
  assert paths == synthetic.dataset_paths(root)
  with pytest.raises(ValueError, match=r"DONE.json: synthetic dataset exists with .*'seed': 5.* "
                                       r"but .*'seed': 6.* was requested"):
    synthetic.ensure_synthetic_dataset(root, **{**_SYN, "seed": 6})


@pytest.mark.parametrize("damage, reason", [
    (lambda r: os.remove(os.path.join(r, "annotations", "instances_unlabeled.json")),
     r"instances_unlabeled.json is missing or unreadable"),
    (lambda r: _truncate(os.path.join(r, "annotations", "instances_val.json"), 9),
     r"instances_val.json is missing or unreadable \(JSONDecodeError\)"),
    (lambda r: os.remove(glob.glob(os.path.join(r, "images", "train", "*"))[0]),
     r"instances_train.json lists 2 images \(1 missing"),
])
def test_case10_partial_or_concurrent_dataset_is_detected_and_kept(tmp_path, damage, reason):
  from sized_detr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / "partial")
  synthetic.make_synthetic_dataset(root, **_SYN)
  damage(root)  # an interrupted generation / one still being written by another process
  before = _mtimes(root)
  with pytest.raises(ValueError, match=rf"exists but is not a complete synthetic dataset .*"
                                       rf"{reason}.*no DONE.json marker, so a generation was "
                                       rf"interrupted, another process is writing it"):
    synthetic.ensure_synthetic_dataset(root, **_SYN)
  assert _mtimes(root) == before and not os.path.exists(os.path.join(root, "DONE.json"))


def test_case10_lost_generation_race_uses_the_winners_dataset(tmp_path, monkeypatch):
  from sized_detr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / "race")
  real = synthetic.make_synthetic_dataset

  def slow_loser(out_dir, *args, **kwargs):  # another process finishes first, mid-generation
    monkeypatch.setattr(synthetic, "make_synthetic_dataset", real)
    synthetic.ensure_synthetic_dataset(root, **_SYN)
    return real(out_dir, *args, **kwargs)

  monkeypatch.setattr(synthetic, "make_synthetic_dataset", slow_loser)
  paths = synthetic.ensure_synthetic_dataset(root, **_SYN)
  assert paths == synthetic.dataset_paths(root)
  assert json.load(open(os.path.join(root, "DONE.json")))["seed"] == 5
  assert not glob.glob(str(tmp_path / ".synthetic-*"))  # the loser's temporary folder is gone


def test_case13_synthetic_cli_negative_seed_names_the_flag(tmp_path, capsys):
  from sized_detr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  assert synthetic.main(["--out", str(tmp_path / "s"), "--seed", "-1"]) == 1
  err = capsys.readouterr().err.strip()
  assert err == "error: synthetic dataset: seed (--seed) must be an integer >= 0, got -1"
  assert not (tmp_path / "s").exists()


# --------------------------------------------------------------- config values (cases 5, 13)
@pytest.mark.parametrize("field, value, message", [
    ("optimizer.lr", 1e39, r"config.optimizer.lr=1e\+39 is not a finite float32 number"),
    ("optimizer.lr", float("nan"), r"config.optimizer.lr=nan is not a finite float32 number"),
    ("optimizer.lr", 2.0, r"config.optimizer.lr=2.0 must be in \(0, 1\]"),
    ("optimizer.lr", 0.0, r"config.optimizer.lr=0.0 must be in \(0, 1\]"),
    ("criterion.bbox_loss_coef", float("inf"), r"config.criterion.bbox_loss_coef=inf is not a "),
    ("optimizer.weight_decay", -0.1, r"config.optimizer.weight_decay=-0.1 must be >= 0"),
    ("data.batch_size", 0, r"config.data.batch_size=0 must be an integer >= 1"),
    ("data.buckets", ("abc",), r"config.data.buckets=\('abc',\) must be None or a list of "
                               r"\(height, width\) pairs of positive integers"),
    ("data.scales", (), r"config.data.scales=\(\) must be a non-empty list"),
    ("seed", -1, r"config.seed=-1 must be an integer >= 0"),
    ("total_steps", -5, r"config.total_steps=-5 must be an integer >= 0"),
    ("ema_momentum", -0.5, r"config.ema_momentum=-0.5 must be in \[0, 1\]"),
    ("ema_momentum", 1.5, r"config.ema_momentum=1.5 must be in \[0, 1\]"),
])
def test_case5_case13_config_values_rejected_up_front_naming_the_field(field, value, message):
  from sized_detr_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(os.path.join(_ROOT, "experiments", "synthetic.py"), "smoke")
  config_lib.validate_config(config)  # the shipped config passes
  node = config
  *parents, leaf = field.split(".")
  for part in parents:
    node = node[part]
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(config)


# ------------------------------------------------------------ run.py flags (cases 12 and 13)

_BAD_FLAGS = [
    (["--config.total_steps=abc"],
     r"flag --config.total_steps=abc: invalid literal for int\(\) with base 10: 'abc'"),
    (["--config.optimizer.lr=abc"],
     r"flag --config.optimizer.lr=abc: could not convert string to float: 'abc'"),
    (["--config=experiments/nope.py"],
     r"--config=experiments/nope.py: config file experiments/nope.py not found"),
    (["--config=experiments/synthetic.py:nonsense"],
     r"--config=experiments/synthetic.py:nonsense: ValueError: synthetic: unknown "
     r"variant tokens \['nonsense'\]; known: \('smoke', 'small', 'sized_l1', 'plain'\)"),
    (["--config=synthetic:nonsense"],
     r"--config=synthetic:nonsense: ValueError: synthetic: unknown variant tokens"),
    (["--mode=bogus"], r"flag --mode=bogus: value should be one of <train\|eval\|predict\|summary>"),
    (["--workdir={file}"], r"FileExistsError: --workdir=.*a_file exists and is not a folder"),
    (["--config.data.batch_size=0"], r"ValueError: config.data.batch_size=0 must be an integer"),
    (["--config.data.buckets=abc"], r"ValueError: config.data.buckets=\('abc',\) must be None or"),
    (["--config.optimizer.lr=1e39"], r"config.optimizer.lr=1e\+39 is not a finite float32"),
    (["--config.seed=-1"], r"ValueError: config.seed=-1 must be an integer >= 0"),
]
# One subprocess per case: a flag parse error and a config value error run in the fast tier.
_FAST_FLAGS = ("--config.total_steps=abc", "--config.data.batch_size=0")


@pytest.mark.parametrize("args, message", [
    pytest.param(args, message, marks=() if args[0] in _FAST_FLAGS else pytest.mark.slow)
    for args, message in _BAD_FLAGS
], ids=lambda v: v[0].split("/")[-1] if isinstance(v, list) else "")
def test_case12_case13_bad_flags_give_one_line_and_no_traceback(tmp_path, args, message):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  a_file = tmp_path / "a_file"
  a_file.write_text("not a folder")
  args = [a.format(file=a_file) for a in args]
  env = {k: v for k, v in os.environ.items() if k != "SIZED_DETR_TRACEBACK"}
  proc = subprocess.run([sys.executable, "run.py", *args], cwd=_ROOT, capture_output=True,
                        text=True, timeout=300, env=env)
  assert proc.returncode == 1
  assert proc.stdout == ""
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("run.py: ") and "(SIZED_DETR_TRACEBACK=1 shows the traceback)" in lines[0]
  assert re.search(message, lines[0]), lines[0]
  assert a_file.read_text() == "not a folder"


def test_case12_traceback_on_request():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, "run.py", "--config.data.batch_size=0"], cwd=_ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "SIZED_DETR_TRACEBACK": "1"})
  assert proc.returncode != 0
  assert "Traceback (most recent call last)" in proc.stderr
  assert "ValueError: config.data.batch_size=0 must be an integer >= 1" in proc.stderr
