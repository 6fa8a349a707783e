"""PyTorch -> Flax conversion on synthetic state dicts with the real DINO / torchvision names."""
import pathlib

import jax
import numpy as np
import pytest

from sized_detr_jax import config_lib
from sized_detr_jax import convert_torch as ct

CONFIG = pathlib.Path(__file__).parents[1] / "experiments" / "dino_r50.py"

HIDDEN, FFN, HEADS, LEVELS, POINTS, CLASSES, QUERIES, WIDTH = 32, 64, 4, 4, 4, 4, 20, 8


def _torch_state_dict(rng, enc_layers=1, dec_layers=2):
  """Names and PyTorch layouts of IDEA-Research/DINO's DINO-4scale modules (tiny sizes)."""
  sd = {}
  def put(name, *shape):
    sd[name] = rng.normal(size=shape).astype(np.float32)
  def bn(name, c):
    for k in ("weight", "bias", "running_mean"):
      put(f"{name}.{k}", c)
    sd[f"{name}.running_var"] = rng.uniform(0.5, 2, size=c).astype(np.float32)
  b = "backbone.0.body."
  put(b + "conv1.weight", WIDTH, 3, 7, 7)
  bn(b + "bn1", WIDTH)
  in_ch = WIDTH
  for s in range(1, 5):
    w = WIDTH * 2 ** (s - 1)
    p = f"{b}layer{s}.0."
    put(p + "conv1.weight", w, in_ch, 1, 1)
    put(p + "conv2.weight", w, w, 3, 3)
    put(p + "conv3.weight", 4 * w, w, 1, 1)
    for i, c in ((1, w), (2, w), (3, 4 * w)):
      bn(f"{p}bn{i}", c)
    put(p + "downsample.0.weight", 4 * w, in_ch, 1, 1)
    bn(p + "downsample.1", 4 * w)
    in_ch = 4 * w
  for lvl, (c, k) in enumerate([(64, 1), (128, 1), (256, 1), (256, 3)]):
    put(f"input_proj.{lvl}.0.weight", HIDDEN, c, k, k)
    for n in ("0.bias", "1.weight", "1.bias"):
      put(f"input_proj.{lvl}.{n}", HIDDEN)
  put("label_enc.weight", CLASSES + 1, HIDDEN)
  t = "transformer."
  put(t + "level_embed", LEVELS, HIDDEN)
  put(t + "tgt_embed.weight", QUERIES, HIDDEN)
  def linear(name, out, inp):
    put(name + ".weight", out, inp)
    put(name + ".bias", out)
  def msda(name):
    linear(name + ".sampling_offsets", HEADS * LEVELS * POINTS * 2, HIDDEN)
    linear(name + ".attention_weights", HEADS * LEVELS * POINTS, HIDDEN)
    linear(name + ".value_proj", HIDDEN, HIDDEN)
    linear(name + ".output_proj", HIDDEN, HIDDEN)
  def ffn_norms(name, norms):
    linear(name + ".linear1", FFN, HIDDEN)
    linear(name + ".linear2", HIDDEN, FFN)
    for n in norms:
      linear(f"{name}.{n}", HIDDEN, 1)
      sd[f"{name}.{n}.weight"] = sd[f"{name}.{n}.weight"][:, 0]
  for i in range(enc_layers):
    msda(f"{t}encoder.layers.{i}.self_attn")
    ffn_norms(f"{t}encoder.layers.{i}", ("norm1", "norm2"))
  for i in range(dec_layers):
    d = f"{t}decoder.layers.{i}"
    msda(d + ".cross_attn")
    put(d + ".self_attn.in_proj_weight", 3 * HIDDEN, HIDDEN)
    put(d + ".self_attn.in_proj_bias", 3 * HIDDEN)
    linear(d + ".self_attn.out_proj", HIDDEN, HIDDEN)
    ffn_norms(d, ("norm1", "norm2", "norm3"))
  put(t + "decoder.norm.weight", HIDDEN)
  put(t + "decoder.norm.bias", HIDDEN)
  linear(t + "decoder.ref_point_head.layers.0", HIDDEN, 2 * HIDDEN)
  linear(t + "decoder.ref_point_head.layers.1", HIDDEN, HIDDEN)
  linear(t + "enc_output", HIDDEN, HIDDEN)
  put(t + "enc_output_norm.weight", HIDDEN)
  put(t + "enc_output_norm.bias", HIDDEN)
  linear(t + "enc_out_class_embed", CLASSES, HIDDEN)
  for j, out in enumerate((HIDDEN, HIDDEN, 4)):
    linear(f"{t}enc_out_bbox_embed.layers.{j}", out, HIDDEN)
  # Shared heads: one tensor, repeated under every decoder index and both owners.
  linear("class_embed.0", CLASSES, HIDDEN)
  for j, out in enumerate((HIDDEN, HIDDEN, 4)):
    linear(f"bbox_embed.0.layers.{j}", out, HIDDEN)
  shared = {k: v for k, v in sd.items() if k.startswith(("class_embed.0", "bbox_embed.0"))}
  for owner in ("", "transformer.decoder."):
    for i in range(dec_layers):
      for k, v in shared.items():
        sd[owner + k.replace(".0.", f".{i}.", 1)] = v.copy()
  return sd


@pytest.fixture(scope="module")
def template():
  config = config_lib.load_config(str(CONFIG), "smoke")
  return ct.params_template(config.model)


@pytest.fixture(scope="module")
def state_dict():
  return _torch_state_dict(np.random.default_rng(0))


def test_full_conversion_fills_every_param(template, state_dict):
  params = ct.convert_state_dict(state_dict, template, source="dino")
  got = jax.tree_util.tree_flatten_with_path(params)[0]
  want = jax.tree_util.tree_flatten_with_path(template)[0]
  assert [p for p, _ in got] == [p for p, _ in want]
  for (_, a), (_, b) in zip(got, want):
    assert a.shape == b.shape
  sd, t = state_dict, params["transformer"]
  # Layout changes, checked by hand on representative tensors.
  np.testing.assert_array_equal(params["backbone"]["conv1"]["kernel"],
                                sd["backbone.0.body.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["backbone"]["layer3_0"]["downsample_bn"]["var"],
                                sd["backbone.0.body.layer3.0.downsample.1.running_var"])
  np.testing.assert_array_equal(t["decoder_layers_1"]["self_attn"]["in_proj_kernel"],
                                sd["transformer.decoder.layers.1.self_attn.in_proj_weight"].T)
  # Decoder norm2 follows self-attention in both codes, norm1 cross-attention.
  np.testing.assert_array_equal(t["decoder_layers_0"]["norm2"]["scale"],
                                sd["transformer.decoder.layers.0.norm2.weight"])
  np.testing.assert_array_equal(t["encoder_layers_0"]["self_attn"]["sampling_offsets"]["kernel"],
                                sd["transformer.encoder.layers.0.self_attn.sampling_offsets."
                                   "weight"].T)
  np.testing.assert_array_equal(t["bbox_embed"]["layers_2"]["bias"],
                                sd["transformer.decoder.bbox_embed.1.layers.2.bias"])
  np.testing.assert_array_equal(params["input_proj_3"]["norm"]["bias"], sd["input_proj.3.1.bias"])
  np.testing.assert_array_equal(params["label_enc"]["embedding"], sd["label_enc.weight"])
  np.testing.assert_array_equal(t["tgt_embed"], sd["transformer.tgt_embed.weight"])


def test_per_layer_heads(state_dict):
  """A DINO with dec_pred_*_embed_share=False: index i fills the layer-i heads of a model
  built with share_decoder_heads=False (both owners' copies equal)."""
  rng = np.random.default_rng(5)
  sd = {k: v for k, v in state_dict.items()
        if not k.startswith(("class_embed.", "bbox_embed.", "transformer.decoder.class_embed.",
                             "transformer.decoder.bbox_embed."))}
  for i in range(2):
    own = {f"class_embed.{i}.weight": (CLASSES, HIDDEN), f"class_embed.{i}.bias": (CLASSES,)}
    for j, out in enumerate((HIDDEN, HIDDEN, 4)):
      own[f"bbox_embed.{i}.layers.{j}.weight"] = (out, HIDDEN)
      own[f"bbox_embed.{i}.layers.{j}.bias"] = (out,)
    for k, shape in own.items():
      sd[k] = rng.normal(size=shape).astype(np.float32)
      sd["transformer.decoder." + k] = sd[k].copy()
  config = config_lib.load_config(str(CONFIG), "smoke")
  template = ct.params_template(dict(config.model, share_decoder_heads=False))
  t = ct.convert_state_dict(sd, template, source="dino")["transformer"]
  assert "class_embed" not in t and "bbox_embed" not in t
  for i in range(2):
    np.testing.assert_array_equal(t[f"class_embed_{i}"]["kernel"], sd[f"class_embed.{i}.weight"].T)
    np.testing.assert_array_equal(t[f"bbox_embed_{i}"]["layers_2"]["bias"],
                                  sd[f"bbox_embed.{i}.layers.2.bias"])
  bad = dict(sd)
  bad["transformer.decoder.bbox_embed.1.layers.0.bias"] = sd["bbox_embed.1.layers.0.bias"] + 1
  with pytest.raises(ValueError, match="transformer/bbox_embed_1/layers_0/bias"):
    ct.convert_state_dict(bad, template, source="dino")


def test_errors_list_every_problem(template, state_dict):
  bad = dict(state_dict)
  del bad["transformer.decoder.layers.1.linear2.bias"]
  bad["transformer.extra.weight"] = np.zeros(3, np.float32)
  bad["transformer.enc_output.weight"] = np.zeros((3, 3), np.float32)
  bad["transformer.decoder.class_embed.1.bias"] = bad["class_embed.1.bias"] + 1
  with pytest.raises(ValueError) as e:
    ct.convert_state_dict(bad, template, source="dino")
  msg = str(e.value)
  assert "transformer.extra.weight" in msg and "unused" in msg
  assert "transformer/decoder_layers_1/linear2/bias" in msg and "unfilled" in msg
  assert "transformer.enc_output.weight (3, 3)" in msg and "shape mismatch" in msg
  assert "differ" in msg and "transformer/class_embed/bias" in msg
  # 91-class heads into a 4-class model: skipped on request, the rest still converts.
  wide = dict(state_dict)
  for k in [k for k in wide if "class_embed" in k]:
    wide[k] = np.zeros((91,) + wide[k].shape[1:], np.float32)
  out = ct.convert_state_dict(wide, template, source="dino", skip_shape_mismatch=True)
  assert "class_embed" not in out["transformer"] and "bbox_embed" in out["transformer"]


def test_class_rows_reindex_category_ids(template, state_dict):
  # Checkpoint heads with 8 "category id" rows; our 4 classes are ids (1, 2, 4, 6).
  rows = np.array([1, 2, 4, 6])
  wide = dict(state_dict)
  rng = np.random.default_rng(3)
  head_w = rng.normal(size=(8, HIDDEN)).astype(np.float32)
  head_b = rng.normal(size=8).astype(np.float32)
  for k in [k for k in wide if "class_embed" in k]:
    wide[k] = head_w if k.endswith("weight") else head_b
  wide["label_enc.weight"] = rng.normal(size=(9, HIDDEN)).astype(np.float32)
  out = ct.convert_state_dict(wide, template, source="dino", class_rows=rows)
  t = out["transformer"]
  np.testing.assert_array_equal(t["class_embed"]["kernel"], head_w[rows].T)
  np.testing.assert_array_equal(t["enc_out_class_embed"]["bias"], head_b[rows])
  np.testing.assert_array_equal(out["label_enc"]["embedding"],
                                wide["label_enc.weight"][[1, 2, 4, 6, 8]])


def test_torchvision_backbone_and_merge_roundtrip(template, state_dict, tmp_path):
  prefix = "backbone.0.body."
  tv = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  tv["fc.weight"] = np.zeros((10, 256), np.float32)
  tv["fc.bias"] = np.zeros(10, np.float32)
  tv["bn1.num_batches_tracked"] = np.zeros((), np.int64)
  backbone = ct.convert_state_dict(tv, template, source="torchvision")
  assert set(backbone) == {"backbone"}
  ct.save_npz(tmp_path / "r50.npz", backbone)
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
  merged = ct.merge_pretrained_params(init, {"pretrained_backbone": str(tmp_path / "r50.npz")})
  np.testing.assert_array_equal(merged["backbone"]["layer4_0"]["conv2"]["kernel"],
                                tv["layer4.0.conv2.weight"].transpose(2, 3, 1, 0))
  assert not np.any(merged["transformer"]["tgt_embed"])  # untouched
  with pytest.raises(ValueError, match="unfilled"):
    ct.convert_state_dict({k: v for k, v in tv.items() if "layer2" not in k}, template,
                          source="torchvision")


def test_cli_on_npz(state_dict, tmp_path):
  np.savez(tmp_path / "ckpt.npz", **state_dict)
  ct.main(["--source=dino", f"--input={tmp_path / 'ckpt.npz'}",
           f"--output={tmp_path / 'out.npz'}", f"--config={CONFIG}:smoke"])
  loaded = ct.load_npz(tmp_path / "out.npz")
  np.testing.assert_array_equal(loaded["transformer"]["level_embed"],
                                state_dict["transformer.level_embed"])
