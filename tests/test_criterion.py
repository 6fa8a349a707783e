"""Tests for sized_detr_jax.criterion against a float64 numpy re-derivation of DINO's losses,
sharded vs unsharded normalisation, the one-host-call matching wrapper, and gradients."""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import optimize

from sized_detr_jax import criterion
from sized_detr_jax import matching

B, Q, C, G, D, LAYERS = 4, 5, 3, 3, 4, 3


# --- a tiny hand-built batch -----------------------------------------------------------------


def make_example():
  """Outputs/targets/matches in the shared contract's format: B=4 images, 3 decoder layers."""
  rng = np.random.default_rng(0)
  f32 = lambda x: np.asarray(x, np.float32)

  def boxes(*shape):
    return f32(np.concatenate([rng.uniform(0.3, 0.7, shape + (2,)),
                               rng.uniform(0.05, 0.5, shape + (2,))], -1))

  valid = np.array([[True, False, True], [False, True, False], [False, False, False],
                    [True, True, True]])
  targets = {
      "boxes": np.where(valid[..., None], boxes(B, G), 0.0).astype(np.float32),
      "labels": np.where(valid, rng.integers(0, C, (B, G)), 0).astype(np.int32),
      "valid": valid,
      "orig_size": np.array([[480, 640], [100, 150], [800, 800], [1000, 1200]], np.int32),
      "size": np.array([[600, 800], [533, 800], [800, 800], [666, 800]], np.int32),
  }
  branch = lambda: {"pred_logits": f32(rng.normal(size=(B, Q, C)) * 2), "pred_boxes": boxes(B, Q)}
  outputs = branch()
  outputs["aux_outputs"] = [branch() for _ in range(LAYERS - 1)]
  outputs["interm_outputs"] = branch()
  outputs["dn_outputs"] = {"pred_logits": f32(rng.normal(size=(LAYERS, B, D, C))),
                           "pred_boxes": boxes(LAYERS, B, D)}
  outputs["dn_meta"] = {
      "gt_index": np.array([[0, 2, 0, 2], [1, -1, 1, -1], [-1] * 4, [0, 1, 2, 0]], np.int32),
      "positive": np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], bool),
      "valid": np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool),
  }

  def random_matches():
    m = np.full((B, G), -1, np.int32)
    for b in range(B):
      cols = np.flatnonzero(valid[b])
      m[b, cols] = rng.permutation(Q)[:len(cols)]
    return m

  matches = {"final": random_matches(),
             "aux": np.stack([random_matches() for _ in range(LAYERS - 1)]),
             "interm": random_matches()}
  return outputs, targets, matches


# --- float64 numpy reference -----------------------------------------------------------------


def np_focal(logits, t, alpha=0.25, gamma=2.0):
  p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
  ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  p_t = p * t + (1 - p) * (1 - t)
  return (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t)**gamma


def np_giou(a, b):
  xyxy = lambda x: np.concatenate([x[..., :2] - x[..., 2:] / 2, x[..., :2] + x[..., 2:] / 2], -1)
  a, b = xyxy(a.astype(np.float64)), xyxy(b.astype(np.float64))
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a) + area(b) - inter
  ewh = np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2])
  enclosing = ewh[..., 0] * ewh[..., 1]
  # IDEA-Research/DINO's denominators: union + 1e-6, enclosing + 1e-6.
  return inter / (union + 1e-6) - (enclosing - union) / (enclosing + 1e-6)


def np_box_losses(pred, target, bbox_loss, rescale):
  """Lists of paired boxes [N, 4] -> per-pair (box loss [N], giou loss [N]) in float64."""
  pred, target = np.asarray(pred, np.float64).reshape(-1, 4), np.asarray(target, np.float64).reshape(-1, 4)
  diff = np.abs(pred - target)
  if bbox_loss == "l1":
    box = diff.sum(-1)
  else:
    wx, wy = (target[:, 2].mean(), target[:, 3].mean()) if rescale else (1.0, 1.0)
    box = (wx * (diff[:, 0] + diff[:, 2]) / target[:, 2]
           + wy * (diff[:, 1] + diff[:, 3]) / target[:, 3])
  return box, 1.0 - np_giou(pred, target)


def np_matched(out, targets, m, bbox_loss, rescale):
  """(ce_sum, box_sum, giou_sum, per-pair list of (b, g, box, giou))."""
  onehot = np.zeros((B, Q, C))
  pairs = [(b, g) for b in range(B) for g in range(G) if targets["valid"][b, g] and m[b, g] >= 0]
  for b, g in pairs:
    onehot[b, m[b, g], targets["labels"][b, g]] = 1.0
  pred = [out["pred_boxes"][b, m[b, g]] for b, g in pairs]
  tgt = [targets["boxes"][b, g] for b, g in pairs]
  box, giou = np_box_losses(pred, tgt, bbox_loss, rescale)
  ce = np_focal(out["pred_logits"], onehot).sum()
  return ce, box.sum(), giou.sum(), list(zip(pairs, box, giou))


def np_criterion(outputs, targets, matches, bbox_loss="l1", rescale=False, interm_coef=1.0):
  """DINO's SetCriterion re-derived in float64: loss dict + total."""
  num_boxes = max(targets["valid"].sum(), 1)
  ref = {}
  branches = [("", outputs, matches["final"])]
  branches += [(f"_aux_{i}", a, matches["aux"][i]) for i, a in enumerate(outputs["aux_outputs"])]
  branches += [("_interm", outputs["interm_outputs"], matches["interm"])]
  for suffix, out, m in branches:
    ce, box, giou, _ = np_matched(out, targets, m, bbox_loss, rescale)
    ref.update({f"loss_ce{suffix}": ce / num_boxes, f"loss_bbox{suffix}": box / num_boxes,
                f"loss_giou{suffix}": giou / num_boxes})
  meta, dn = outputs["dn_meta"], outputs["dn_outputs"]
  num_dn = max(meta["positive"].sum(), 1)
  for layer in range(LAYERS):
    suffix = "_dn" if layer == LAYERS - 1 else f"_dn_aux_{layer}"
    onehot = np.zeros((B, D, C))
    pred, tgt = [], []
    for b in range(B):
      for d in range(D):
        if meta["positive"][b, d]:
          g = meta["gt_index"][b, d]
          onehot[b, d, targets["labels"][b, g]] = 1.0
          pred.append(dn["pred_boxes"][layer, b, d])
          tgt.append(targets["boxes"][b, g])
    ce = (np_focal(dn["pred_logits"][layer], onehot) * meta["valid"][..., None]).sum()
    box, giou = np_box_losses(pred, tgt, bbox_loss, rescale)
    ref.update({f"loss_ce{suffix}": ce / num_dn, f"loss_bbox{suffix}": box.sum() / num_dn,
                f"loss_giou{suffix}": giou.sum() / num_dn})
  coef = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
  total = 0.0
  for name, value in ref.items():
    prefix = "_".join(name.split("_")[:2])
    total += coef[prefix] * value * (interm_coef if name.endswith("_interm") else 1.0)
  ref["loss"] = total
  return ref


def assert_losses_close(got, want, rtol=2e-5):
  loss_names = {k for k in got if k.startswith("loss")}
  assert loss_names == set(want), sorted(loss_names ^ set(want))
  for name, value in want.items():
    np.testing.assert_allclose(float(got[name]), value, rtol=rtol, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def example():
  return make_example()


@pytest.fixture(scope="module")
def jit_matches():
  return jax.jit(criterion.compute_matches)


@pytest.fixture(scope="module")
def jitted():
  """One compiled criterion per config, shared by the tests."""
  cache = {}

  def get(**cfg):
    key = tuple(sorted(cfg.items()))
    if key not in cache:
      resolved = criterion.CriterionConfig(**cfg)
      cache[key] = jax.jit(lambda o, t, m: criterion.set_criterion(o, t, m, resolved))
    return cache[key]

  return get


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bbox_loss,rescale", [("l1", False), ("sized_l1", True)])
def test_criterion_matches_numpy_reference(example, jitted, bbox_loss, rescale):
  outputs, targets, matches = example
  got = jitted(bbox_loss=bbox_loss, sized_l1_rescale=rescale)(outputs, targets, matches)
  assert_losses_close(got, np_criterion(outputs, targets, matches, bbox_loss, rescale))


def test_sized_l1_without_rescale_and_interm_coef(example):
  outputs, targets, matches = example
  cfg = criterion.CriterionConfig.from_config(ml_collections.ConfigDict(
      {"bbox_loss": "sized_l1", "interm_loss_coef": 0.5, "use_dn": False}))
  got = criterion.set_criterion(outputs, targets, matches, cfg)
  want = np_criterion(outputs, targets, matches, "sized_l1", False, interm_coef=0.5)
  assert not any("_dn" in k for k in got)
  want = {k: v for k, v in want.items() if "_dn" not in k}
  want["loss"] = sum(v * {"ce": 1.0, "bbox": 5.0, "giou": 2.0}[k.split("_")[1]]
                     * (0.5 if k.endswith("_interm") else 1.0)
                     for k, v in want.items() if k != "loss")
  assert_losses_close(got, want)


def test_per_size_metrics(example, jitted):
  outputs, targets, matches = example
  got = jitted()(outputs, targets, matches)
  _, _, _, pairs = np_matched(outputs, targets, matches["final"], "l1", False)
  per_size = {"small": [], "medium": [], "large": []}
  for (b, g), box, giou in pairs:
    h, w = targets["orig_size"][b]
    area = targets["boxes"][b, g, 2] * w * targets["boxes"][b, g, 3] * h
    name = "small" if area < 32**2 else "medium" if area < 96**2 else "large"
    per_size[name].append((box, giou))
  assert sum(len(v) for v in per_size.values()) == targets["valid"].sum()
  assert len(per_size["small"]) and len(per_size["large"])  # the example covers the ranges
  for name, items in per_size.items():
    assert float(got[f"metric_num_boxes_{name}"]) == len(items)
    want_box = np.mean([x[0] for x in items]) if items else 0.0
    want_giou = np.mean([x[1] for x in items]) if items else 0.0
    np.testing.assert_allclose(float(got[f"metric_loss_bbox_{name}"]), want_box, rtol=2e-5)
    np.testing.assert_allclose(float(got[f"metric_loss_giou_{name}"]), want_giou, rtol=2e-5)
  assert float(got["metric_num_boxes"]) == targets["valid"].sum()
  # The per-kind weighted sums partition the total.
  parts = [float(got[f"metric_weighted_{k}"]) for k in ("ce", "bbox", "giou")]
  np.testing.assert_allclose(sum(parts), float(got["loss"]), rtol=1e-6)
  np.testing.assert_allclose(parts[1], sum(5.0 * float(v) for k, v in got.items()
                                           if k.startswith("loss_bbox")), rtol=1e-6)


@pytest.mark.slow
def test_sharded_normalisation_equals_unsharded(example, jitted):
  """jit with a sharded batch, and shard_map with axis_name, both give the global values."""
  outputs, targets, matches = example
  mesh = jax.make_mesh((4,), ("data",))
  want = jitted(bbox_loss="sized_l1", sized_l1_rescale=True)(outputs, targets, matches)

  def batch_spec(path, x):
    # Arrays whose batch axis is 1: stacked layers (dn outputs, aux matches).
    keys = [getattr(p, "key", getattr(p, "idx", None)) for p in path]
    axis = 1 if ("dn_outputs" in keys or "aux" in keys) else 0
    return P(*([None] * axis), "data")

  tree = (outputs, targets, matches)
  specs = jax.tree_util.tree_map_with_path(batch_spec, tree)
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)
  got = jitted(bbox_loss="sized_l1", sized_l1_rescale=True)(*sharded)
  for name in want:
    np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-5, err_msg=name)

  cfg = criterion.CriterionConfig(bbox_loss="sized_l1", sized_l1_rescale=True)
  per_shard = jax.shard_map(
      lambda o, t, m: criterion.set_criterion(o, t, m, cfg, axis_name="data"), mesh=mesh,
      in_specs=specs, out_specs=P())
  got = jax.jit(per_shard)(*sharded)
  for name in want:
    np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-5, err_msg=name)
  # Without axis_name each shard would normalise by its own box count: the test can fail.
  local = jax.jit(jax.shard_map(
      lambda o, t, m: criterion.set_criterion(o, t, m, cfg)["loss_bbox"][None], mesh=mesh,
      in_specs=specs, out_specs=P("data")))
  assert not np.isclose(float(jnp.mean(local(*sharded))), float(want["loss_bbox"]), rtol=1e-3)


def test_compute_matches_one_host_call_and_optimal(example, jit_matches, count_host_calls):
  outputs, targets, _ = example
  matches = jit_matches(outputs, targets)
  assert count_host_calls == [(LAYERS + 1, B, Q, G)]  # final + 2 aux + interm, one call
  branches = [outputs] + outputs["aux_outputs"] + [outputs["interm_outputs"]]
  stacked = np.concatenate([matches["final"][None], matches["aux"], matches["interm"][None]])
  cost = np.asarray(jax.jit(matching.matching_cost)(
      np.stack([b["pred_logits"] for b in branches]), np.stack([b["pred_boxes"] for b in branches]),
      targets["labels"], targets["boxes"], targets["valid"]), np.float64)  # [N, B, Q, G]
  for n in range(len(branches)):
    for b in range(B):
      cols = np.flatnonzero(targets["valid"][b])
      got = stacked[n, b, cols]
      assert len(set(got.tolist())) == len(cols) and np.all(got >= 0)
      rows, sel = optimize.linear_sum_assignment(cost[n, b][:, cols])
      np.testing.assert_allclose(cost[n, b][got, cols].sum(), cost[n, b][rows, cols[sel]].sum(),
                                 rtol=1e-9)
      assert np.all(stacked[n, b, ~targets["valid"][b]] == -1)

  count_host_calls.clear()
  mesh = jax.make_mesh((4,), ("data",))
  with jax.set_mesh(mesh):  # the trainer's form: the mesh entered once, matching per shard
    sharded = jax.jit(criterion.compute_matches)(outputs, targets)
  jax.block_until_ready(sharded)
  assert sorted(count_host_calls) == [(LAYERS + 1, B // 4, Q, G)] * 4
  for key in matches:
    np.testing.assert_array_equal(np.asarray(sharded[key]), np.asarray(matches[key]))


def test_compute_matches_pruned_keeps_optimal_totals(example, count_host_calls):
  """criterion.matcher_prune=True: per device shard, the host gets [N, B/4, G, G] candidates
  (not the cost) and every branch's matching has the unpruned optimal total."""
  outputs, targets, _ = example
  # Repeat the queries with shifted boxes (Q = 10 > 2 G) so pruning applies.
  widen = lambda b: {"pred_logits": jnp.concatenate([b["pred_logits"], -b["pred_logits"]], 1),
                     "pred_boxes": jnp.concatenate([b["pred_boxes"], b["pred_boxes"][:, ::-1]],
                                                   1)}
  outputs = dict(widen(outputs), aux_outputs=[widen(a) for a in outputs["aux_outputs"]],
                 interm_outputs=widen(outputs["interm_outputs"]))
  assert matching.prunes(2 * Q, G)
  match = jax.jit(criterion.compute_matches, static_argnums=2)
  full = match(outputs, targets, criterion.CriterionConfig())
  count_host_calls.clear()
  with jax.set_mesh(jax.make_mesh((4,), ("data",))):
    pruned = match(outputs, targets, criterion.CriterionConfig(matcher_prune=True))
  jax.block_until_ready(pruned)
  assert count_host_calls == []  # the candidates solver ran, not the full-cost one
  branches = [outputs] + outputs["aux_outputs"] + [outputs["interm_outputs"]]
  cost = np.asarray(jax.jit(matching.matching_cost)(
      np.stack([b["pred_logits"] for b in branches]), np.stack([b["pred_boxes"] for b in branches]),
      targets["labels"], targets["boxes"], targets["valid"]), np.float64)  # [N, B, Q, G]
  stack = lambda m: np.concatenate([m["final"][None], m["aux"], m["interm"][None]])
  got, want = stack(pruned), stack(full)
  for n, b in itertools.product(range(len(branches)), range(B)):
    cols = np.flatnonzero(targets["valid"][b])
    assert np.all(got[n, b, ~targets["valid"][b]] == -1)
    assert len(set(got[n, b, cols].tolist())) == len(cols) and np.all(got[n, b, cols] >= 0)
    np.testing.assert_allclose(cost[n, b][got[n, b, cols], cols].sum(),
                               cost[n, b][want[n, b, cols], cols].sum(), rtol=1e-9)


@pytest.mark.slow
def test_dino_criterion_value_and_finite_gradients(example, jit_matches):
  """The trainer's one call: matches + losses, differentiable, equal to the numpy reference."""
  outputs, targets, _ = example
  cfg = criterion.CriterionConfig(bbox_loss="sized_l1", sized_l1_rescale=True)
  meta = outputs["dn_meta"]
  floats = {k: v for k, v in outputs.items() if k != "dn_meta"}
  loss = lambda o: criterion.dino_criterion(dict(o, dn_meta=meta), targets, cfg)["loss"]
  value, grads = jax.jit(jax.value_and_grad(loss))(floats)
  matches = jax.tree.map(np.asarray, jit_matches(outputs, targets))
  want = np_criterion(outputs, targets, matches, "sized_l1", True)["loss"]
  np.testing.assert_allclose(float(value), want, rtol=2e-5)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(grads))
  assert np.any(np.asarray(grads["pred_boxes"]) != 0)
  # Padded ground truth (zero boxes) and invalid dn slots contribute no gradient.
  assert np.all(np.asarray(grads["dn_outputs"]["pred_logits"])[:, 2] == 0)
  # The trainer's form: host matching per device shard (shard_map) inside jax.grad.
  mesh = jax.make_mesh((4,), ("data",))
  with jax.set_mesh(mesh):
    value_mesh, grads_mesh = jax.jit(jax.value_and_grad(loss))(floats)
  np.testing.assert_allclose(float(value_mesh), float(value), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads_mesh, grads)


@pytest.mark.slow
def test_compute_matches_pads_shorter_interm_branch(example):
  outputs, targets, _ = example
  outputs = dict(outputs, interm_outputs={k: v[:, :2] for k, v in outputs["interm_outputs"].items()})
  matches = criterion.compute_matches(outputs, targets)
  interm = np.asarray(matches["interm"])
  assert interm.max() < 2
  # Image 3 has 3 valid boxes but only 2 interm queries: one box is left unmatched.
  assert np.sum(interm[3] >= 0) == 2 and np.all(interm[~targets["valid"]] == -1)


def test_one_to_many_criterion_matches_numpy(example):
  outputs, targets, _ = example
  cfg = criterion.CriterionConfig(cls_loss_coef=2.0, use_dn=False, o2m_topk=3)
  got = jax.jit(lambda o, t: criterion.one_to_many_criterion(o, t, cfg))(outputs, targets)
  branches = [("", outputs)] + [(f"_aux_{i}", a) for i, a in enumerate(outputs["aux_outputs"])]
  branches += [("_interm", outputs["interm_outputs"])]
  want = {}
  for suffix, out in branches:
    # The assignment itself is checked against a loop re-derivation in test_matching.py.
    a = matching.task_aligned_assign(out["pred_logits"], out["pred_boxes"], targets["labels"],
                                     targets["boxes"], targets["valid"], topk=3)
    query_gt, w = np.asarray(a.query_gt), np.asarray(a.query_targets, np.float64)
    assert np.sum(query_gt >= 0) >= 3 and np.all(w[query_gt < 0] == 0)
    y = np.zeros((B, Q, C))
    pred, tgt, weight = [], [], []
    for b, q in zip(*np.nonzero(query_gt >= 0)):
      y[b, q, targets["labels"][b, query_gt[b, q]]] = w[b, q]
      pred.append(out["pred_boxes"][b, q])
      tgt.append(targets["boxes"][b, query_gt[b, q]])
      weight.append(w[b, q])
    p = 1 / (1 + np.exp(-out["pred_logits"].astype(np.float64)))
    ce = -(y * np.log(p) + (1 - y) * np.log(1 - p)) * np.abs(y - p)**2
    box, giou = np_box_losses(pred, tgt, "l1", False)
    norm = max(w.sum(), 1.0)
    want.update({f"loss_ce{suffix}": ce.sum() / norm, f"loss_bbox{suffix}": box @ weight / norm,
                 f"loss_giou{suffix}": giou @ weight / norm})
  want["loss"] = sum(v * {"ce": 2.0, "bbox": 5.0, "giou": 2.0}[k.split("_")[1]]
                     for k, v in want.items())
  assert_losses_close(got, want)


def test_config_resolution_and_errors():
  assert criterion.CriterionConfig.from_config({"giou_loss_coef": 3.0}).giou_loss_coef == 3.0
  default = criterion.default_criterion_config()
  assert criterion.CriterionConfig.from_config(default) == criterion.CriterionConfig()
  assert (default.cls_loss_coef, default.bbox_loss_coef, default.giou_loss_coef) == (1.0, 5.0, 2.0)
  with pytest.raises(ValueError, match="bbox_loss must be one of"):
    criterion.CriterionConfig.from_config({"bbox_loss": "smooth_l1"})
  with pytest.raises(ValueError, match=r"unknown fields \['lr'\]"):
    criterion.CriterionConfig.from_config({"bbox_loss": "l1", "lr": 1e-4})
  with pytest.raises(TypeError, match="CriterionConfig"):  # resolved once, not per call
    criterion.set_criterion({}, {}, {}, {"bbox_loss": "l1"})
  with pytest.raises(ValueError, match="unknown loss name"):
    criterion.loss_weights(["loss_mask"])
  w = criterion.loss_weights(["loss_ce_interm", "loss_bbox_dn_aux_0", "loss_giou"],
                             criterion.CriterionConfig(interm_loss_coef=0.5))
  assert w == {"loss_ce_interm": 0.5, "loss_bbox_dn_aux_0": 5.0, "loss_giou": 2.0}


def test_criterion_rejects_mismatched_shapes(example):
  outputs, targets, matches = example
  bad = dict(targets, labels=targets["labels"][:, :-1])  # labels [B, G-1] vs valid [B, G]
  with pytest.raises(AssertionError):
    criterion.set_criterion(outputs, bad, matches)


def np_iou(a, b):
  """Elementwise IoU of cxcywh boxes in float64 (DINO's +1e-6 on the union)."""
  xyxy = lambda x: np.concatenate([x[..., :2] - x[..., 2:] / 2, x[..., :2] + x[..., 2:] / 2], -1)
  a, b = xyxy(np.asarray(a, np.float64)), xyxy(np.asarray(b, np.float64))
  wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
  inter = wh[..., 0] * wh[..., 1]
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  return inter / (area(a) + area(b) - inter + 1e-6)


def test_quality_focal_classification_matches_numpy(example):
  """cls_loss="qfl" (Co-DINO): the matched queries' soft target is the IoU of their box with
  the ground truth; every other (query, class) is a negative, BCE * p^2."""
  outputs, targets, matches = example
  cfg = criterion.CriterionConfig(cls_loss="qfl", use_dn=False)
  got = jax.jit(lambda o, t, m: criterion.set_criterion(o, t, m, cfg))(outputs, targets, matches)
  logits = np.asarray(outputs["pred_logits"], np.float64)
  soft = np.zeros_like(logits)
  m = np.asarray(matches["final"])
  for b in range(B):
    for g in range(G):
      if targets["valid"][b, g] and m[b, g] >= 0:
        q = m[b, g]
        soft[b, q, targets["labels"][b, g]] = np_iou(outputs["pred_boxes"][b, q],
                                                     targets["boxes"][b, g])
  p = 1 / (1 + np.exp(-logits))
  qfl = -(soft * np.log(p) + (1 - soft) * np.log(1 - p)) * np.abs(soft - p) ** 2
  np.testing.assert_allclose(float(got["loss_ce"]), qfl.sum() / max(targets["valid"].sum(), 1),
                             rtol=1e-5)
  focal = criterion.set_criterion(outputs, targets, matches, criterion.CriterionConfig(
      use_dn=False))
  assert float(got["loss_bbox"]) == float(focal["loss_bbox"])  # only classification changes
  with pytest.raises(ValueError, match="cls_loss must be one of"):
    criterion.CriterionConfig(cls_loss="ce")
