"""inference.json (what training writes for inference) and the detector's partial restore, on
hand-made configs and checkpoints (no training)."""
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from sized_detr_jax import config_lib
from sized_detr_jax import detector as detector_lib
from sized_detr_jax import inference_spec


def _config(name, tokens):
  return config_lib.finalize(config_lib.load_config(name, tokens))


def test_postprocess_stages_follow_each_method():
  semi = _config("semi_detr", "synthetic,smoke")
  switch = semi.semi.switch_step
  assert 0 < switch <= semi.total_steps
  stages = inference_spec.postprocess_stages(semi)
  assert [(s["from_step"], s["kind"]) for s in stages] == [(0, "nms"), (switch, "topk")]
  spec = {"postprocess": stages}
  # SemiConfig.stage_at: stage 2 (one-to-one, top-k) from switch_step completed steps on.
  steps = (0, switch - 1, switch, semi.total_steps)
  assert [inference_spec.postprocess_at(spec, s)["kind"] for s in steps] == [
      "nms", "nms", "topk", "topk"]
  assert stages[0]["iou_threshold"] == semi.semi.nms_iou
  co = config_lib.load_config("co_dino", "synthetic,smoke")
  co.model.soft_nms_iou = 0.7
  assert inference_spec.postprocess_stages(config_lib.finalize(co)) == [
      {"from_step": 0, "kind": "soft_nms", "num_select": co.model.num_select,
       "iou_threshold": 0.7}]
  dino = _config("synthetic", "smoke")
  assert inference_spec.postprocess_stages(dino) == [
      {"from_step": 0, "kind": "topk", "num_select": dino.model.num_select}]


def test_from_run_reads_the_params_layout_and_the_ema_choice():
  config = _config("synthetic", "smoke")  # eval_ema True
  info = {"category_ids": np.array([3, 7]), "category_names": ["x", "y"]}
  plain = inference_spec.from_run(config, info, {"backbone": {}}, ema_params={"backbone": {}})
  assert plain["params"] == {"collection": "ema_params", "subtree": []}
  assert plain["categories"] == [{"id": 3, "name": "x"}, {"id": 7, "name": "y"}]
  wrapped = inference_spec.from_run(config, info, {"dino": {}, "projector": {}}, None)
  assert wrapped["params"] == {"collection": "params", "subtree": ["dino"]}  # no EMA kept
  config.eval_ema = False
  assert inference_spec.from_run(config, info, {}, {})["params"]["collection"] == "params"
  assert plain["preprocess"]["eval_size"] == config.data.eval_size
  assert plain["preprocess"]["buckets"] == [list(b) for b in config.data.buckets]


def test_read_rejects_unknown_formats(tmp_path):
  with pytest.raises(inference_spec.MissingSpecError):
    inference_spec.read(str(tmp_path))
  (tmp_path / "inference.json").write_text(json.dumps({"format": 99}))
  with pytest.raises(ValueError, match="format 99, this code reads format 1"):
    inference_spec.read(str(tmp_path))
  (tmp_path / "inference.json").write_text("{not json")
  with pytest.raises(ValueError, match="cannot read it"):
    inference_spec.read(str(tmp_path))


def test_restore_params_reads_only_the_detector(tmp_path):
  """A Semi-DETR-like state: params {dino, projector}, EMA {dino}, optimiser state. Only the
  asked subtree comes back, equal to what was saved."""
  rng = np.random.default_rng(0)
  arr = lambda *shape: rng.normal(size=shape).astype(np.float32)
  state = {"params": {"dino": {"w": arr(3, 4), "b": arr(4)}, "projector": {"w": arr(2, 2)}},
           "ema_params": {"dino": {"w": arr(3, 4), "b": arr(4)}},
           "opt_state": {"mu": {"dino": {"w": arr(3, 4)}}}, "step": np.int32(5),
           "model_state": {}}
  step_dir = tmp_path / "checkpoints" / "5"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(step_dir / "state", state)
  for collection in ("params", "ema_params"):
    params, model_state = detector_lib.restore_params(str(step_dir), collection, ["dino"])
    assert set(params) == {"w", "b"} and model_state == {}
    for key in ("w", "b"):
      np.testing.assert_array_equal(params[key], state[collection]["dino"][key])
  whole, _ = detector_lib.restore_params(str(step_dir), "params", [])
  assert set(whole) == {"dino", "projector"}
  no_ema = tmp_path / "checkpoints" / "6"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(no_ema / "state", {k: v for k, v in state.items() if k != "ema_params"})
  with pytest.raises(KeyError, match="holds no ema_params"):
    detector_lib.restore_params(str(no_ema), "ema_params", ["dino"])
