"""The assembled tiny DINO under jit and a 2-device batch sharding: output contract, padding
invariance, denoising isolation, gradients, remat, scanned layers, bfloat16, postprocess,
optimiser labels."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax import config_lib
from sized_detr_jax.models import deformable_transformer as transformer_lib
from sized_detr_jax.models import dino
from sized_detr_jax.models.testing import random_params

CONFIG = pathlib.Path(__file__).parents[1] / "experiments" / "dino_r50.py"

dino_r50 = config_lib.load_config_module(str(CONFIG))

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
  # Compile time dominates these tests; XLA optimisations do not change the results checked.
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def _targets(batch):
  boxes = np.array([[0.3, 0.4, 0.2, 0.3], [0.6, 0.6, 0.4, 0.3], [0.5, 0.5, 0.1, 0.1]],
                   np.float32)
  return {"boxes": jnp.asarray(np.tile(boxes, (batch, 1, 1))),
          "labels": jnp.asarray(np.tile([1, 3, 0], (batch, 1)), jnp.int32),
          "valid": jnp.asarray(np.tile([True, False, True], (batch, 1)))}


def _training_loss(model):
  """(params, images, mask, targets, key) -> (a loss over the main, denoising and encoder
  outputs, the outputs) in training mode."""
  def loss_and_outputs(params, images, mask, targets, key):
    out = model.apply({"params": params}, images, mask, targets, train=True, rngs={"dn": key})
    loss = (jnp.sum(out["pred_boxes"]) + jnp.sum(jax.nn.sigmoid(out["pred_logits"]))
            + jnp.sum(out["dn_outputs"]["pred_boxes"]) + jnp.sum(out["interm_outputs"]
                                                                 ["pred_boxes"]))
    return loss, out
  return loss_and_outputs


@pytest.fixture(scope="module")
def tiny():
  config = dino_r50.get_config("smoke,invariant")
  # The training functions use rematerialised layers; eval uses the plain model, so the tests
  # comparing them also check remat.
  model = dino.build_dino(dict(config.model, remat=True))
  plain = dino.build_dino(config.model)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, SIZE, SIZE, 3))
  mask = jnp.ones((2, SIZE, SIZE), bool).at[1, :, 48:].set(False)  # image 1 is 64x48
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, mask)["params"]
  params = random_params(shapes, seed=1)

  loss_and_outputs = _training_loss(model)

  # As in train.py's step: batch sharded over an Auto `data` mesh axis, params replicated.
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:2])
  shard = lambda x: jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
  images, mask = shard(images), shard(mask)
  params = jax.device_put(params, jax.NamedSharding(mesh, jax.P()))
  train_grad = jax.jit(jax.value_and_grad(loss_and_outputs, has_aux=True))
  train_apply = jax.jit(lambda p, x, m, t, k: loss_and_outputs(p, x, m, t, k)[1])
  eval_apply = jax.jit(lambda p, x, m: plain.apply({"params": p}, x, m))
  (_, out), grads = train_grad(params, images, mask, jax.tree.map(shard, _targets(2)),
                               jax.random.PRNGKey(5))
  assert out["pred_logits"].sharding.spec[0] == "data"
  return dict(config=config, model=model, params=params, images=images, mask=mask,
              out=out, grads=grads, train_apply=train_apply, eval_apply=eval_apply)


@pytest.mark.slow
def test_output_contract(tiny):
  out, cfg = tiny["out"], tiny["config"].model
  b, q, c, layers = 2, cfg.num_queries, cfg.num_classes, cfg.dec_layers
  assert out["pred_logits"].shape == (b, q, c) and out["pred_boxes"].shape == (b, q, 4)
  assert len(out["aux_outputs"]) == layers - 1
  for aux in out["aux_outputs"] + [out["interm_outputs"]]:
    assert aux["pred_logits"].shape == (b, q, c) and aux["pred_boxes"].shape == (b, q, 4)
  d = out["dn_meta"]["gt_index"].shape[1]
  assert d == 2 * max(cfg.dn_number, 3)
  assert out["dn_outputs"]["pred_logits"].shape == (layers, b, d, c)
  assert out["dn_outputs"]["pred_boxes"].shape == (layers, b, d, 4)
  assert out["dn_meta"]["positive"].dtype == bool and out["dn_meta"]["valid"].dtype == bool
  # 2 valid boxes (columns 0 and 2) -> dn_number // 2 = 5 groups of 4 slots.
  np.testing.assert_array_equal(np.asarray(out["dn_meta"]["gt_index"][0, :4]), [0, 2, 0, 2])
  assert int(out["dn_meta"]["valid"][0].sum()) == 20
  for leaf in jax.tree.leaves(out):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(leaf)))
  boxes = np.asarray(out["pred_boxes"])
  assert boxes.min() >= 0 and boxes.max() <= 1


@pytest.mark.slow
def test_gradients_finite_and_frozen(tiny):
  grads, labels = jax.device_get(tiny["grads"]), dino.param_labels(tiny["params"])
  for g, label in zip(jax.tree.leaves(grads), jax.tree.leaves(labels)):
    assert np.all(np.isfinite(g))
    if label == "frozen":
      assert not np.any(g)
  t = grads["transformer"]
  for name in ("tgt_embed", "level_embed"):
    assert np.any(t[name]), name
  assert np.any(grads["label_enc"]["embedding"])
  assert np.any(grads["backbone"]["layer2_0"]["conv1"]["kernel"])
  assert np.any(t["enc_out_bbox_embed"]["layers_2"]["kernel"])


@pytest.mark.slow
def test_extra_padding_gives_identical_outputs(tiny):
  """The fixture batch (64x64 and 64x48 images in a 64x64 canvas) again in a 128x128 canvas
  with garbage padding: every output, denoising included, must be unchanged."""
  images, mask = tiny["images"], tiny["mask"]
  canvas = jnp.full((2, 2 * SIZE, 2 * SIZE, 3), 3.0).at[:, :SIZE, :SIZE].set(images)
  big_mask = jnp.zeros((2, 2 * SIZE, 2 * SIZE), bool).at[:, :SIZE, :SIZE].set(mask)
  big = tiny["train_apply"](tiny["params"], canvas, big_mask, _targets(2), jax.random.PRNGKey(5))
  small = tiny["out"]
  assert jax.tree.structure(big) == jax.tree.structure(small)
  for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(big)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-4, rtol=2e-4)


@pytest.mark.slow
def test_matching_queries_do_not_see_denoising_queries(tiny):
  out_eval = tiny["eval_apply"](tiny["params"], tiny["images"], tiny["mask"])
  assert "dn_outputs" not in out_eval and "dn_meta" not in out_eval
  out_train = tiny["out"]
  for key in ("pred_logits", "pred_boxes"):
    np.testing.assert_allclose(np.asarray(out_eval[key]), np.asarray(out_train[key]),
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out_eval["interm_outputs"][key]),
                               np.asarray(out_train["interm_outputs"][key]), atol=1e-5)


def _extra_queries(n_groups, per_group, isolated, dim):
  key = jax.random.PRNGKey(9)
  n = n_groups * per_group
  # Drawn for 2 groups and sliced, so group 0 is the same in every call.
  content = jax.random.normal(key, (2, 2 * per_group, dim))[:, :n]
  boxes = jax.random.uniform(jax.random.fold_in(key, 1), (2, 2 * per_group, 4), minval=0.2,
                             maxval=0.6)[:, :n]
  group = np.repeat(np.arange(n_groups), per_group)[None].repeat(2, 0).astype(np.int32)
  if n_groups > 1:
    group[1, -1] = -7  # a padded slot of the last group: sees nothing but itself
  return {"content": content, "boxes_unsigmoid": jnp.log(boxes / (1 - boxes)),
          "group": jnp.asarray(group), "isolated": isolated}


@pytest.mark.slow
def test_extra_query_groups(tiny):
  """Extra slots never change the matching/denoising outputs; isolated groups decode exactly as
  a separate pass of their own (Co-DETR), non-isolated ones also see the matching queries."""
  model, dim = tiny["model"], tiny["config"].model.hidden_dim
  args = (tiny["params"], tiny["images"], tiny["mask"], _targets(2), jax.random.PRNGKey(5))
  outs = {}
  for name, (groups, isolated) in {"shared": (2, False), "isolated": (2, True),
                                   "alone": (1, True)}.items():
    extra = _extra_queries(groups, 3, isolated, dim)
    iso = extra.pop("isolated")
    outs[name] = jax.jit(lambda p, x, m, t, k, e, iso=iso: model.apply(
        {"params": p}, x, m, t, train=True, rngs={"dn": k},
        extra_queries={**e, "isolated": iso}))(*args, extra)
  base = tiny["out"]
  for name in ("shared", "isolated"):
    out = outs[name]
    assert out["extra_outputs"]["hidden"].shape == (len(base["aux_outputs"]) + 1, 2, 6, dim)
    for key in ("pred_logits", "pred_boxes"):
      np.testing.assert_allclose(np.asarray(out[key]), np.asarray(base[key]), atol=1e-5)
      np.testing.assert_allclose(np.asarray(out["dn_outputs"][key]),
                                 np.asarray(base["dn_outputs"][key]), atol=1e-5)
  iso, alone, shared = (outs[k]["extra_outputs"] for k in ("isolated", "alone", "shared"))
  for key in ("hidden", "pred_logits", "pred_boxes"):
    np.testing.assert_allclose(np.asarray(iso[key][:, :, :3]), np.asarray(alone[key]),
                               atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(shared["hidden"]) - np.asarray(iso["hidden"])).max() > 1e-3


@pytest.mark.slow
def test_encode_decode_and_five_scales():
  """`decode(encode(x))` is `__call__`; the 5-scale (C2-C5 + 1) variant has strides 4..64."""
  config = dino_r50.get_config("smoke")
  model = dino.build_dino(dict(config.model, num_backbone_levels=4, num_feature_levels=5))
  images = jax.random.normal(jax.random.PRNGKey(0), (1, SIZE, SIZE, 3))
  mask = jnp.ones((1, SIZE, SIZE), bool)
  params = random_params(jax.eval_shape(model.init, jax.random.PRNGKey(0), images, mask)["params"],
                         seed=2)

  def both(p):
    enc = model.apply({"params": p}, images, mask, method=dino.DINO.encode)
    split = model.apply({"params": p}, enc, method=dino.DINO.decode)
    return enc, split, model.apply({"params": p}, images, mask)

  enc, split, whole = jax.jit(both)(params)
  assert [m.shape[1] for m in enc["memory_maps"]] == [SIZE // s for s in (4, 8, 16, 32, 64)]
  assert [s.shape[-1] for s in enc["srcs"]] == [config.model.hidden_dim] * 5
  for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(whole)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_selection_scores_hand_computed():
  # 5 tokens, 2 classes; token 1 is padding (its constant logit 0.5 beats tokens 2 and 4).
  logits = jnp.array([[[0.9, 0.1], [0.5, 0.2], [0.3, 0.4], [-1.0, 2.0], [0.0, 0.1]]])
  usable = jnp.array([[True, False, True, True, True]])
  dino_score = transformer_lib.selection_scores(logits, usable, "dino")
  valid_score = transformer_lib.selection_scores(logits, usable, "valid_only")
  np.testing.assert_allclose(dino_score, [[0.9, 0.5, 0.4, 2.0, 0.1]], rtol=1e-6)
  np.testing.assert_allclose(valid_score, [[0.9, -np.inf, 0.4, 2.0, 0.1]], rtol=1e-6)
  # Top-3: DINO takes the padding token (3, 0, 1), valid_only the next real one (3, 0, 2).
  np.testing.assert_array_equal(jax.lax.top_k(dino_score, 3)[1], [[3, 0, 1]])
  np.testing.assert_array_equal(jax.lax.top_k(valid_score, 3)[1], [[3, 0, 2]])
  with pytest.raises(ValueError, match="query_selection"):
    transformer_lib.selection_scores(logits, usable, "all")


@pytest.mark.slow
def test_query_selection_rules_in_the_model():
  """With a zero `enc_output` kernel every token has the same encoder logits, so top-k keeps
  the lowest token indices (lax.top_k puts ties in index order) among those it may take, and
  with a zero last box layer an interm box is the token's anchor. 64x48 image in a 64x64
  canvas: level 0 is 8x8 with 6 real columns, the 20 queries come from it.
  DINO's rule: tokens 0..19 (rows 0-1 and 4 of row 2), its padded columns 6-7 give box 1;
  valid_only: real tokens only (rows 0-2 and 2 of row 3)."""
  config = dino_r50.get_config("smoke")
  assert config.model.query_selection == "dino"
  images = jax.random.normal(jax.random.PRNGKey(3), (1, SIZE, SIZE, 3))
  mask = jnp.ones((1, SIZE, SIZE), bool).at[:, :, 48:].set(False)
  models = {r: dino.build_dino(dict(config.model, query_selection=r))
            for r in ("dino", "valid_only")}
  shapes = jax.eval_shape(models["dino"].init, jax.random.PRNGKey(0), images, mask)["params"]
  params = random_params(shapes, seed=4)
  t = params["transformer"]
  t["enc_output"]["kernel"] = jnp.zeros_like(t["enc_output"]["kernel"])
  last = t["enc_out_bbox_embed"]["layers_2"]
  t["enc_out_bbox_embed"]["layers_2"] = jax.tree.map(jnp.zeros_like, last)
  out = jax.jit(lambda p: {r: m.apply({"params": p}, images, mask)
                           for r, m in models.items()})(params)

  def anchors(tokens):
    want = []
    for k in tokens:
      i, j = divmod(k, 8)
      want.append([1.0] * 4 if j >= 6 else [(j + 0.5) / 6, (i + 0.5) / 8, 0.05, 0.05])
    return np.array(want)

  q = config.model.num_queries
  real = [k for k in range(64) if k % 8 < 6][:q]
  np.testing.assert_allclose(out["dino"]["interm_outputs"]["pred_boxes"][0], anchors(range(q)),
                             rtol=1e-5)
  np.testing.assert_allclose(out["valid_only"]["interm_outputs"]["pred_boxes"][0], anchors(real),
                             rtol=1e-5)
  for leaf in jax.tree.leaves(out):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  with pytest.raises(ValueError, match="needs query_selection='valid_only'"):
    dino.build_dino(dict(config.model, padding_invariant=True)).init(
        jax.random.PRNGKey(0), images, mask)


@pytest.mark.slow
def test_per_layer_heads(tiny):
  """share_decoder_heads=False: one class Linear and box MLP per decoder layer, same shapes as
  the shared pair; with every copy equal to the shared one the outputs are the shared model's,
  and layer i's logits read only copy i."""
  config = dict(tiny["config"].model, share_decoder_heads=False)
  model = dino.build_dino(config)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tiny["images"], tiny["mask"])
  t_new, t_old = shapes["params"]["transformer"], tiny["params"]["transformer"]
  n_layers = config["dec_layers"]
  assert "class_embed" not in t_new and "bbox_embed" not in t_new
  assert set(t_new) - set(t_old) == ({f"class_embed_{i}" for i in range(n_layers)}
                                     | {f"bbox_embed_{i}" for i in range(n_layers)})
  for i in range(n_layers):
    for name in ("class_embed", "bbox_embed"):
      assert (jax.tree.map(lambda x: x.shape, t_new[f"{name}_{i}"])
              == jax.tree.map(lambda x: x.shape, t_old[name]))
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  heads = size(t_old["class_embed"]) + size(t_old["bbox_embed"])
  assert size(shapes["params"]) == size(tiny["params"]) + (n_layers - 1) * heads

  t = {k: v for k, v in t_old.items() if k not in ("class_embed", "bbox_embed")}
  for i in range(n_layers):
    t[f"class_embed_{i}"], t[f"bbox_embed_{i}"] = t_old["class_embed"], t_old["bbox_embed"]
  params = dict(tiny["params"], transformer=t)
  apply = jax.jit(lambda p: model.apply({"params": p}, tiny["images"], tiny["mask"]))
  same = apply(params)
  shared = tiny["eval_apply"](tiny["params"], tiny["images"], tiny["mask"])
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(shared)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)
  last = f"class_embed_{n_layers - 1}"
  t2 = dict(t, **{last: dict(t[last], bias=t[last]["bias"] + 0.5)})
  changed = apply(dict(params, transformer=t2))
  np.testing.assert_array_equal(changed["aux_outputs"][0]["pred_logits"],
                                same["aux_outputs"][0]["pred_logits"])
  np.testing.assert_array_equal(changed["pred_boxes"], same["pred_boxes"])
  np.testing.assert_allclose(changed["pred_logits"] - same["pred_logits"], 0.5, rtol=1e-5)


@pytest.mark.slow
def test_scan_layers_matches_unrolled(tiny):
  """scan_layers=True: same parameter tree, same outputs and gradients as the unrolled layers
  (the fixture's remat model, training mode with denoising, batch-sharded), and for per-layer
  decoder heads (each layer's box MLP travels in the scan) with distinct random heads."""
  config = dict(tiny["config"].model, remat=True, scan_layers=True)
  model = dino.build_dino(config)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tiny["images"], tiny["mask"])
  assert (jax.tree.map(lambda x: x.shape, shapes["params"])
          == jax.tree.map(lambda x: x.shape, tiny["params"]))

  (_, out), grads = jax.jit(jax.value_and_grad(_training_loss(model), has_aux=True))(
      tiny["params"], tiny["images"], tiny["mask"],
      jax.tree.map(lambda x: jax.device_put(x, tiny["images"].sharding), _targets(2)),
      jax.random.PRNGKey(5))
  assert jax.tree.structure(out) == jax.tree.structure(tiny["out"])
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tiny["out"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree.leaves(tiny["grads"])):
    scale = float(np.max(np.abs(b))) or 1.0
    np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))

  per_layer = dict(tiny["config"].model, share_decoder_heads=False)
  unrolled, scanned = dino.build_dino(per_layer), dino.build_dino(dict(per_layer,
                                                                       scan_layers=True))
  params = random_params(jax.eval_shape(unrolled.init, jax.random.PRNGKey(0), tiny["images"],
                                        tiny["mask"])["params"], seed=2)
  run = lambda m: jax.jit(lambda p: m.apply({"params": p}, tiny["images"], tiny["mask"]))(params)
  a, b = run(scanned), run(unrolled)
  assert not np.allclose(b["pred_logits"], b["aux_outputs"][0]["pred_logits"], atol=1e-3)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute(tiny):
  # Also the only run of the reference (not padding-invariant) code path.
  model = dino.build_dino(dict(tiny["config"].model, dtype="bfloat16", padding_invariant=False))
  fn = lambda p, x, m: model.apply({"params": p}, x, m)
  # The heavy ops run in bfloat16 while params and outputs stay float32.
  jaxpr = str(jax.make_jaxpr(fn)(tiny["params"], tiny["images"], tiny["mask"]))
  for op in ("conv_general_dilated", "dot_general"):
    lines = [l for l in jaxpr.splitlines() if op in l and "=" in l]
    assert lines and sum("bf16" in l.split("=")[0] for l in lines) > len(lines) // 2, op
  out = jax.jit(fn)(tiny["params"], tiny["images"], tiny["mask"])
  for leaf in jax.tree.leaves(out):
    assert leaf.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(leaf)))


def test_postprocess_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 3)).astype(np.float32)
  boxes = rng.uniform(0.2, 0.6, size=(2, 4, 4)).astype(np.float32)
  sizes = np.array([[100, 200], [50, 80]], np.int32)
  got = jax.jit(dino.postprocess, static_argnums=2)(
      {"pred_logits": jnp.asarray(logits), "pred_boxes": jnp.asarray(boxes)},
      jnp.asarray(sizes), 5)
  for b in range(2):
    prob = 1 / (1 + np.exp(-logits[b].astype(np.float64)))
    order = np.argsort(-prob.ravel())[:5]
    qi, ci = order // 3, order % 3
    np.testing.assert_allclose(np.asarray(got["scores"][b]), prob.ravel()[order], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got["labels"][b]), ci)
    cx, cy, w, h = boxes[b, qi].T
    hh, ww = sizes[b]
    xyxy = np.stack([(cx - w / 2) * ww, (cy - h / 2) * hh, (cx + w / 2) * ww,
                     (cy + h / 2) * hh], -1)
    np.testing.assert_allclose(np.asarray(got["boxes_xyxy"][b]), xyxy, rtol=1e-5, atol=1e-4)
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], -1)
    np.testing.assert_allclose(np.asarray(got["boxes_xywh"][b]), xywh, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_param_labels(tiny):
  labels = dino.param_labels(tiny["params"])
  assert labels["backbone"]["conv1"]["kernel"] == "frozen"
  assert labels["backbone"]["layer1_0"]["conv2"]["kernel"] == "frozen"
  assert labels["backbone"]["layer2_0"]["bn1"]["scale"] == "frozen"
  assert labels["backbone"]["layer2_0"]["conv2"]["kernel"] == "backbone"
  enc = labels["transformer"]["encoder_layers_0"]["self_attn"]
  assert enc["sampling_offsets"]["kernel"] == "linear_proj"
  assert enc["value_proj"]["kernel"] == "default"
  assert labels["input_proj_0"]["conv"]["kernel"] == "default"


def test_config_errors():
  with pytest.raises(ValueError, match="unknown variant"):
    dino_r50.get_config("huge")
  with pytest.raises(ValueError, match="unknown fields"):
    dino.build_dino({"hidden_dims": 3})
