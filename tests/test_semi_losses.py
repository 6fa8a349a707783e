"""semi_losses: per-branch box loss choice (both | sup_only), stage-wise criterion, the
unsupervised weight, no unsupervised denoising loss before the switch, and the class-agnostic
encoder proposals."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sized_detr_jax import criterion
from sized_detr_jax.semi import config as semi_config
from sized_detr_jax.semi import losses as semi_losses


def _outputs(rng, b=2, q=6, c=3, dn=4, layers=2):
  def branch():
    return {"pred_logits": rng.normal(size=(b, q, c)).astype(np.float32),
            "pred_boxes": rng.uniform(0.2, 0.6, (b, q, 4)).astype(np.float32)}
  out = branch()
  out["aux_outputs"] = [branch() for _ in range(layers - 1)]
  out["interm_outputs"] = branch()
  out["dn_outputs"] = {"pred_logits": rng.normal(size=(layers, b, dn, c)).astype(np.float32),
                       "pred_boxes": rng.uniform(0.2, 0.6, (layers, b, dn, 4)).astype(np.float32)}
  out["dn_meta"] = {"gt_index": np.array([[0, 1, 0, 1], [0, -1, 0, -1]], np.int32),
                    "positive": np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool),
                    "valid": np.array([[1, 1, 1, 1], [1, 0, 1, 0]], bool)}
  return out


def _targets(rng, b=2, g=3, c=3):
  boxes = np.concatenate([rng.uniform(0.3, 0.6, (b, g, 2)), rng.uniform(0.05, 0.3, (b, g, 2))],
                         -1).astype(np.float32)
  return {"boxes": boxes, "labels": rng.integers(0, c, (b, g)).astype(np.int32),
          "valid": np.array([[1, 1, 0], [1, 0, 1]], bool),
          "size": np.array([[64, 80], [72, 64]], np.int32)}


def _config(branches, bbox_loss="sized_l1", weight=4.0, agnostic=False):
  """(CriterionConfig, SemiConfig) as the semi_detr method resolves them from a ConfigDict."""
  config = ml_collections.ConfigDict({
      "criterion": {"bbox_loss": bbox_loss, "cls_loss_coef": 2.0},
      "semi": {"sized_l1_branches": branches, "unsup_weight": weight,
               "agnostic_interm": agnostic}})
  return (criterion.CriterionConfig.from_config(config.criterion),
          semi_config.SemiConfig.from_config(config.semi))


@pytest.fixture(scope="module")
def case():
  rng = np.random.default_rng(0)
  return _outputs(rng), _targets(rng), _outputs(rng), _targets(rng)


_RESULTS = {}


def _all_losses(case, stage):
  """Both variants and the direct criterion calls, computed once per stage. Stage 1 (many
  small on-device assignment ops) runs faster jitted on CPU, stage 2 (host matching) eagerly."""
  if stage in _RESULTS:
    return _RESULTS[stage]
  run = criterion.one_to_many_criterion if stage == 1 else criterion.dino_criterion

  cfg = lambda **kw: criterion.CriterionConfig(cls_loss_coef=2.0, **kw)

  def fn(out_l, tgt_l, out_u, tgt_u):
    semi = lambda branches: semi_losses.semi_losses(out_l, tgt_l, out_u, tgt_u,
                                                    *_config(branches), stage)
    return {
        "both": semi("both"),
        "sup_only": semi("sup_only"),
        "plain": run(out_u, tgt_u, cfg(bbox_loss="l1", use_dn=stage == 2)),
        "sized": run(out_u, tgt_u, cfg(bbox_loss="sized_l1", use_dn=stage == 2)),
        "sup_sized": run(out_l, tgt_l, cfg(bbox_loss="sized_l1")),
    }

  _RESULTS[stage] = jax.tree.map(float, (jax.jit(fn) if stage == 1 else fn)(*case))
  return _RESULTS[stage]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_sup_only_changes_only_the_unsupervised_box_loss(case, stage):
  res = _all_losses(case, stage)
  both, sup_only = res["both"], res["sup_only"]
  assert set(both) == set(sup_only)
  changed = {k for k in both if k.startswith("unsup_loss_bbox")}
  assert changed and all(both[k] != sup_only[k] for k in changed)
  for k in both:
    if k not in changed and k not in ("loss", "loss_unsup", "unsup_metric_weighted_bbox") and (
        not k.startswith("unsup_metric_loss_bbox")):
      assert both[k] == sup_only[k], k
  # sup_only's unsupervised branch is exactly the plain-L1 criterion on the pseudo-labels.
  for k in changed:
    assert sup_only[k] == pytest.approx(res["plain"][k[len("unsup_"):]], rel=1e-6)
    assert both[k] == pytest.approx(res["sized"][k[len("unsup_"):]], rel=1e-6)
  # The supervised branch keeps Sized L1 in both variants.
  assert both["sup_loss_bbox"] == pytest.approx(res["sup_sized"]["loss_bbox"], rel=1e-6)
  assert sup_only["sup_loss_bbox"] == both["sup_loss_bbox"]
  # Totals.
  for r in (both, sup_only):
    assert r["loss"] == pytest.approx(r["loss_sup"] + 4.0 * r["loss_unsup"], rel=1e-6)


def test_unsupervised_denoising_only_after_the_switch(case):
  stage1, stage2 = _all_losses(case, 1)["both"], _all_losses(case, 2)["both"]
  assert "sup_loss_bbox_dn" in stage1 and "unsup_loss_bbox_dn" not in stage1
  assert "unsup_loss_bbox_dn" in stage2


def test_l1_baseline_is_l1_everywhere(case):
  out_l, tgt_l, out_u, tgt_u = case
  a = semi_losses.semi_losses(out_l, tgt_l, out_u, tgt_u, *_config("both", "l1", 2.0), 2)
  b = semi_losses.semi_losses(out_l, tgt_l, out_u, tgt_u, *_config("sup_only", "l1", 2.0), 2)
  assert all(float(a[k]) == float(b[k]) for k in a)
  assert float(a["loss"]) == pytest.approx(float(a["loss_sup"]) + 2.0 * float(a["loss_unsup"]),
                                           rel=1e-6)


def test_bad_config(case):
  out_l, tgt_l, out_u, tgt_u = case
  with pytest.raises(ValueError, match="sized_l1_branches"):
    semi_losses.semi_losses(out_l, tgt_l, out_u, tgt_u, *_config("unsup_only"), 1)
  with pytest.raises(ValueError, match="stage"):
    semi_losses.semi_losses(out_l, tgt_l, out_u, tgt_u, *_config("both"), 3)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_agnostic_interm_is_the_interm_loss_with_every_label_zero(case, stage):
  """Semi-DETR's encoder proposals: the interm terms equal the criterion's own interm terms on
  the same boxes with all labels 0 (its separate matching / assignment path), the decoder and
  denoising terms equal the labelled criterion's, and the totals add up with the weights."""
  out_l, tgt_l, out_u, tgt_u = case
  run = criterion.one_to_many_criterion if stage == 1 else criterion.dino_criterion
  cfg = criterion.CriterionConfig(cls_loss_coef=2.0, bbox_loss="sized_l1", interm_loss_coef=0.7,
                                  use_dn=stage == 2)

  def fn(out, tgt):
    zero = {**tgt, "labels": jnp.zeros_like(tgt["labels"])}
    return (semi_losses.branch_losses(out, tgt, cfg, stage, agnostic_interm=True),
            run(out, tgt, cfg), run(out, zero, cfg))

  got, labelled, zero = jax.tree.map(float, (jax.jit(fn) if stage == 1 else fn)(out_u, tgt_u))
  assert set(got) == set(labelled)
  weights = criterion.loss_weights([k for k in got if k.startswith("loss_")], cfg)
  for k in got:
    if k.startswith("loss_") and k.endswith("_interm"):
      assert got[k] == pytest.approx(zero[k], rel=1e-5, abs=1e-7), k
    elif k.startswith("loss_") or k == "metric_num_boxes":
      assert got[k] == pytest.approx(labelled[k], rel=1e-5, abs=1e-7), k
  assert got["loss"] == pytest.approx(sum(weights[k] * got[k] for k in weights), rel=1e-5)
  for kind in ("ce", "bbox", "giou"):
    names = [k for k in weights if k == f"loss_{kind}" or k.startswith(f"loss_{kind}_")]
    assert got[f"metric_weighted_{kind}"] == pytest.approx(
        sum(weights[k] * got[k] for k in names), rel=1e-5)
  # The labels matter for the classification term (the case is not degenerate).
  assert abs(zero["loss_ce_interm"] - labelled["loss_ce_interm"]) > 1e-4
  # semi_losses uses it in both branches.
  both = semi_losses.semi_losses(out_l, tgt_l, out_u, tgt_u,
                                 *_config("both", agnostic=True), stage)
  assert float(both["unsup_loss_ce_interm"]) == pytest.approx(got["loss_ce_interm"], rel=1e-5)
  sup = semi_losses.branch_losses(out_l, tgt_l, _config("both")[0], stage)
  assert float(both["sup_loss_ce_interm"]) == pytest.approx(float(sup["loss_ce_interm"]),
                                                            rel=1e-5)
