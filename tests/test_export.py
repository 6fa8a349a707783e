"""The jax.export artifact: docs/inference.md's loader (jax + numpy only) against Detector.predict,
for DINO (a trained smoke run), Co-DINO with soft-NMS and Semi-DETR in both stages (initialised
models); and the spec's postprocess against each method's own evaluation postprocess."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from sized_detr_jax import config_lib
from sized_detr_jax import detector as detector_lib
from sized_detr_jax import export
from sized_detr_jax import inference_spec
from sized_detr_jax import methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # compiles the model several times (~20 s each on 2 cores)


def _loader_source():
  """The loader code block of docs/inference.md (the one defining `load`)."""
  with open(os.path.join(ROOT, "docs", "inference.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  (source,) = [b for b in blocks if "def load(" in b]
  assert len(source.strip().splitlines()) <= 30
  return source


def _assert_same(exported_out, dets):
  """Export outputs (one image) equal the Detector's detections (score_threshold=0, all K)."""
  scores, labels, boxes, valid = (np.asarray(o) for o in exported_out)
  keep = valid & (scores >= 0.0)
  order = np.argsort(-scores[keep], kind="stable")
  np.testing.assert_allclose(scores[keep][order], dets.scores, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels[keep][order], dets.labels)
  np.testing.assert_allclose(boxes[keep][order], dets.boxes, rtol=1e-5, atol=1e-5)


def test_docs_loader_runs_the_export_of_a_trained_run(trained_smoke_run, tmp_path):
  """Subprocess that imports only jax, numpy and PIL runs the docs' loader on the artifact."""
  det = detector_lib.Detector.load(trained_smoke_run["workdir"])
  path = str(tmp_path / "detector.npz")
  assert export.main([f"--workdir={trained_smoke_run['workdir']}", f"--out={path}",
                      "--platforms=cpu,cuda,tpu"]) == 0
  images = sorted(os.listdir(os.path.join(trained_smoke_run["data"], "images", "val")))[:2]
  images = [os.path.join(trained_smoke_run["data"], "images", "val", n) for n in images]
  rng = np.random.default_rng(1)
  extra = str(tmp_path / "portrait.png")  # another size and orientation than the val images
  Image.fromarray(rng.integers(0, 256, (181, 97, 3), np.uint8)).save(extra)
  images.append(extra)
  script = _loader_source() + f"""
import sys
exported, params, meta = load({path!r})
outs = [detect(exported, params, meta, Image.open(p).convert("RGB")) for p in {images!r}]
np.savez({str(tmp_path / "out.npz")!r}, **{{f"{{k}}_{{i}}": o for i, out in enumerate(outs)
                                        for k, o in zip("slbv", out)}})
print(json.dumps({{"platforms": list(exported.platforms), "meta": meta["platforms"],
                  "ours": sorted(m for m in sys.modules if m.startswith("sized_detr_jax"))}}))
"""
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=600, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  assert info == {"platforms": ["cpu", "cuda", "tpu"], "meta": ["cpu", "cuda", "tpu"],
                  "ours": []}
  out = np.load(tmp_path / "out.npz")
  for i, dets in enumerate(det.predict(images, score_threshold=0.0)):
    _assert_same([out[f"{k}_{i}"] for k in "slbv"], dets)


def _initialised_detector(config_name, tokens, step, **model_overrides):
  """An untrained Detector of a config, with the spec training writes."""
  config = config_lib.load_config(config_name, tokens)
  config.model.update(model_overrides)
  config = config_lib.finalize(config)
  if step == "switch":
    step = int(config.semi.switch_step)
  return config, detector_lib.Detector.initialised(config, step=step, batch_size=2)


@pytest.mark.parametrize("config_name,tokens,step,overrides,kind", [
    ("co_dino", "synthetic,smoke", 0, {"soft_nms_iou": 0.8}, "soft_nms"),
    ("semi_detr", "synthetic,smoke", 0, {}, "nms"),
    ("semi_detr", "synthetic,smoke", "switch", {}, "topk"),  # at config.semi.switch_step
])
def test_export_round_trip_and_method_postprocess(config_name, tokens, step, overrides, kind,
                                                  tmp_path):
  config, det = _initialised_detector(config_name, tokens, step, **overrides)
  assert det.postprocess["kind"] == kind
  # The spec's postprocess is the method's evaluation postprocess at that step.
  method = methods.build(config)
  rng = np.random.default_rng(0)
  q, c = int(config.model.num_queries), int(config.model.num_classes)
  outputs = {"pred_logits": jnp.asarray(rng.normal(size=(2, q, c)) * 3, jnp.float32),
             "pred_boxes": jnp.asarray(rng.uniform(0.1, 0.6, size=(2, q, 4)), jnp.float32)}
  batch = {"orig_size": jnp.asarray([[120, 90], [64, 200]], jnp.int32)}
  want = method.postprocess(method.stage_at(det.step))(outputs, batch)
  got = inference_spec.make_postprocess(det.postprocess)(outputs, batch)
  for key in ("scores", "labels", "boxes_xyxy"):
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
  # Export (batch 2) against Detector.predict on two images of different shapes.
  path = str(tmp_path / "m.npz")
  meta = export.export(det, path, batch=2)
  assert meta["platforms"] == ["cpu"] and meta["postprocess"]["kind"] == kind
  images = [rng.integers(0, 256, (150, 230, 3), np.uint8),
            rng.integers(0, 256, (240, 130, 3), np.uint8)]
  dets = det.predict(images, score_threshold=0.0)
  z = np.load(path)
  exported = jax.export.deserialize(bytearray(z["exported"].tobytes()))
  params = [z[f"param_{i:05d}"] for i in range(meta["num_params"])]
  assert "callback" not in exported.mlir_module()
  pre = det.spec["preprocess"]
  canvas = np.zeros((2, meta["height"], meta["width"], 3), np.uint8)
  views, origs = [], []
  for k, image in enumerate(images):
    vh, vw = _docs_view_size(*image.shape[:2], pre["eval_size"], pre["eval_max_size"])
    canvas[k, :vh, :vw] = np.asarray(Image.fromarray(image).resize((vw, vh), Image.BILINEAR))
    views.append((vh, vw))
    origs.append(image.shape[:2])
  out = exported.call(*params, canvas, np.int32(views), np.int32(origs))
  for k in range(2):
    _assert_same([np.asarray(o)[k] for o in out], dets[k])


def _docs_view_size(*args):
  namespace = {}
  exec(_loader_source(), namespace)  # pylint: disable=exec-used
  return namespace["view_size"](*args)


def test_bad_arguments_give_one_line(trained_smoke_run, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    export.main([f"--workdir={trained_smoke_run['workdir']}", f"--out={tmp_path / 'x.npz'}",
                 "--platforms=cpu,rocm"])
  assert "one of ('cpu', 'cuda', 'tpu')" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(SystemExit) as e:
    export.main([f"--workdir={trained_smoke_run['workdir']}", f"--out={tmp_path / 'x.npz'}",
                 "--size=64x64"])
  assert "smaller than the evaluation resize" in str(e.value)
  del capsys
