"""The side-by-side benchmark's JAX half (tiny config, no torch) and the torch-free helpers of
benchmarks/official_dino.py (selection / denoising injection, name and match mapping).

The comparison with the official model itself is tests/test_conformance_torch.py (opt-in)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax.benchmarks import official_dino
from sized_detr_jax.benchmarks import vs_pytorch
from sized_detr_jax.models import deformable_transformer
from sized_detr_jax.models import denoising


@pytest.mark.slow
def test_jax_half_reports_every_field(tmp_path, capsys):
  out = tmp_path / "report.json"
  report = vs_pytorch.main(["--jax_only", "--config_arg=tiny", "--sizes=64x64", "--batch=1",
                            "--boxes=2", "--reps=2", f"--json={out}"])
  printed = capsys.readouterr().out
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  meta = report["meta"]
  assert meta["frameworks"] == ["jax"] and meta["modes"] == ["eval", "train"]
  assert meta["padded"] == [64, 64] and len(meta["load_before"]) == 3
  assert len(meta["load_after"]) == 3
  for mode in ("eval", "train"):
    r = report["timing"][mode]["jax"]
    assert len(r["runs"]) == 2 and all(t > 0 for t in r["runs"])
    assert r["min_s"] == min(r["runs"]) and r["median_s"] == pytest.approx(np.median(r["runs"]))
    assert r["trace_s"] > 0 and r["compile_s"] > 0 and r["setup_s"] > 0
    # A process that imported jax and ran a model holds far more than 100 MB.
    assert 0.1 < r["peak_rss_gb"] < 64
    assert np.isfinite(r["last_loss"])
    assert r["device_peak_gb"] is None  # CPU
    assert f"{mode:6} jax" in printed
  assert "peak_rss_gb" in printed and "compile_s" in printed and "load (1/5/15 min)" in printed
  assert "config dino_r50:tiny" in printed  # the packaged config, by name


def test_bad_arguments_name_the_flag(tmp_path):
  with pytest.raises(ValueError, match="--sizes"):
    vs_pytorch.main(["--jax_only", "--sizes=64by64"])
  with pytest.raises(ValueError, match="--dino_src"):
    vs_pytorch.main([f"--dino_src={tmp_path}"])
  with pytest.raises(ValueError, match="--modes"):
    vs_pytorch.main(["--jax_only", "--modes=fit"])


@pytest.mark.slow
def test_worker_failure_shows_its_log(tmp_path):
  with pytest.raises(RuntimeError,
                     match=r"(?s)worker jax_eval exited with [1-9].*variant tokens.*nonsense"):
    vs_pytorch.main(["--jax_only", "--config_arg=nonsense", "--modes=eval", "--reps=1",
                     f"--workdir={tmp_path}"])


def test_injected_selection_forces_the_given_tokens_in_order():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 12, 3)), jnp.float32)
  usable = jnp.asarray(rng.uniform(size=(2, 12)) > 0.3)
  wanted = np.array([[5, 0, 11, 2], [7, 3, 4, 9]], np.int32)

  def topk(use):
    with official_dino.injected_selection(jnp.asarray(wanted), use):
      return jax.lax.top_k(deformable_transformer.selection_scores(logits, usable, "dino"), 4)[1]

  np.testing.assert_array_equal(topk(True), wanted)
  # use=False: the model's own rule (DINO's: max logit over classes, unusable tokens included).
  own = np.argsort(-np.max(np.asarray(logits), -1), axis=1, kind="stable")[:, :4]
  np.testing.assert_array_equal(topk(False), own)
  # The patch is gone after the block.
  np.testing.assert_array_equal(
      np.asarray(deformable_transformer.selection_scores(logits, usable, "dino")),
      np.max(np.asarray(logits), -1))


@pytest.mark.slow
def test_injected_denoising_replaces_the_first_slots_only():
  boxes = jnp.asarray([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]]] * 2, jnp.float32)
  labels = jnp.asarray([[1, 2], [3, 4]], jnp.int32)
  valid = jnp.ones((2, 2), bool)
  # dn_number 5, 2 boxes: 2 groups of [2 positives, 2 negatives] = DINO's P = 8 slots, of
  # this package's D = 2 * max(5, 2) = 10 static slots.
  kwargs = dict(num_classes=5, dn_number=5, label_noise_ratio=0.5, box_noise_scale=0.4)
  key = jax.random.PRNGKey(0)
  plain = denoising.build_denoising_queries(key, boxes, labels, valid, **kwargs)
  p = 8
  dn_labels = np.arange(2 * p, dtype=np.int32).reshape(2, p) % 5
  dn_boxes = np.linspace(-1, 1, 2 * p * 4, dtype=np.float32).reshape(2, p, 4)
  with official_dino.injected_denoising(jnp.asarray(dn_labels), jnp.asarray(dn_boxes)):
    injected = denoising.build_denoising_queries(key, boxes, labels, valid, **kwargs)
  assert np.asarray(plain["valid"])[:, :p].all() and not np.asarray(plain["valid"])[:, p:].any()
  np.testing.assert_array_equal(injected["labels"][:, :p], dn_labels)
  np.testing.assert_array_equal(injected["boxes_unsigmoid"][:, :p], dn_boxes)
  for k in ("gt_index", "positive", "valid", "group"):
    np.testing.assert_array_equal(injected[k], plain[k])
  np.testing.assert_array_equal(injected["labels"][:, p:], plain["labels"][:, p:])


def test_dino_loss_names_map_to_ours():
  assert official_dino.dino_loss_name("loss_ce") == "loss_ce"
  assert official_dino.dino_loss_name("loss_bbox_3") == "loss_bbox_aux_3"
  assert official_dino.dino_loss_name("loss_giou_dn") == "loss_giou_dn"
  assert official_dino.dino_loss_name("loss_ce_dn_0") == "loss_ce_dn_aux_0"
  assert official_dino.dino_loss_name("loss_bbox_interm") == "loss_bbox_interm"


def test_matches_from_official_inverts_query_gt_pairs():
  # Branch 0: image 0 matches gt 1 -> query 7, gt 0 -> query 2; image 1 only gt 0 -> query 4.
  pairs = [[(np.array([2, 7]), np.array([0, 1])), (np.array([4]), np.array([0]))]]
  np.testing.assert_array_equal(official_dino.matches_from_official(pairs, 3),
                                [[[2, 7, -1], [4, -1, -1]]])


def test_compare_selection_treats_unusable_tokens_as_one():
  scores = np.array([[5.0, 4.0, 1.0, 1.0, 3.0, 3.000002]], np.float32)
  usable = np.array([[True, True, False, False, True, True]])
  same = official_dino.compare_selection([[0, 1, 2]], [[0, 1, 3]], scores, usable)
  assert same["positions_differing"] == [0] and same["max_score_gap"] == 0
  assert same["unusable_ours"] == same["unusable_dino"] == [1]
  swapped = official_dino.compare_selection([[0, 5, 4]], [[0, 4, 5]], scores, usable)
  assert swapped["positions_differing"] == [2] and swapped["usable_sets_equal"] == [True]
  assert 0 < swapped["max_score_gap"] < 1e-5
  other = official_dino.compare_selection([[0, 1, 4]], [[0, 1, 2]], scores, usable)
  assert other["usable_sets_equal"] == [False] and other["unusable_dino"] == [1]


def test_make_batch_pads_to_the_largest_size():
  batch = official_dino.make_batch([(40, 50), (30, 60)], batch=3, boxes_per_image=4,
                                   num_classes=10, seed=1)
  assert batch["image"].shape == (3, 40, 60, 3)
  np.testing.assert_array_equal(batch["orig_size"], [[40, 50], [30, 60], [40, 50]])
  assert batch["pixel_mask"][1, :30, :60].all() and not batch["pixel_mask"][1, 30:].any()
  assert not batch["pixel_mask"][0, :, 50:].any()
  assert np.all(batch["image"][~batch["pixel_mask"]] == 0)
  xyxy = np.concatenate([batch["boxes"][..., :2] - batch["boxes"][..., 2:] / 2,
                         batch["boxes"][..., :2] + batch["boxes"][..., 2:] / 2], -1)
  assert xyxy.min() >= 0 and xyxy.max() <= 1
  assert batch["labels"].min() >= 1 and batch["labels"].max() < 10 and batch["valid"].all()
