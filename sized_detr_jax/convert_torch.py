r"""PyTorch weights -> this package's DINO params: official DINO checkpoints, torchvision ResNet-50.

  # ImageNet backbone for training from scratch (torchvision's resnet50 weights):
  python -m sized_detr_jax.convert_torch --source=torchvision \
      --input=resnet50-0676ba61.pth --output=weights/r50_imagenet.npz
  # a full PyTorch DINO checkpoint (e.g. checkpoint0011_4scale.pth), heads re-indexed from
  # COCO category ids (91 rows) to the pipeline's 80 contiguous labels:
  python -m sized_detr_jax.convert_torch --source=dino --input=checkpoint0011_4scale.pth \
      --output=weights/dino_4scale_r50.npz --config=experiments/dino_r50.py \
      --coco_category_rows --unsafe_pickle
  # or keep the 91 rows for a model built with experiments/dino_r50.py:coco91

then point `config.model.pretrained_backbone` (or `config.model.pretrained`) at the .npz and
apply `merge_pretrained_params(params, config.model)` after init.

The mapping works on plain `{name: numpy array}` dicts (`convert_state_dict`), so it needs no
torch; reading a .pth needs `torch` (an optional extra). Inputs may also be .npz files with the
PyTorch names as keys. Conversion is strict: a checkpoint tensor left unused, a parameter left
unfilled or a shape mismatch raises one error listing all of them.

Layout changes: conv OIHW -> HWIO, Linear [out, in] -> kernel [in, out], BatchNorm
weight/bias/running_mean/running_var -> scale/bias/mean/var, LayerNorm/GroupNorm weight ->
scale, packed attention in_proj_weight [3C, C] -> in_proj_kernel [C, 3C]. DINO's state_dict
lists the decoder heads once per layer and owner (bbox_embed.0..5 and
transformer.decoder.bbox_embed.0..5). With shared heads (model.share_decoder_heads=True, DINO's
default) all copies must be equal and fill one parameter (`class_embed`, `bbox_embed`); with
per-layer heads (share_decoder_heads=False, a DINO trained with dec_pred_*_embed_share=False)
index i fills `class_embed_{i}` / `bbox_embed_{i}` and the two owners' copies must be equal.
(Co-DETR's mmdet checkpoints use other names, query_head.cls_branches.i etc.: not mapped.)
"""
import argparse
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

Path = Tuple[str, ...]

# (regex on the PyTorch name, flax path template, transform). Groups fill the template.
_BACKBONE_RULES = [
    (r"conv1\.weight", "backbone/conv1/kernel", "conv"),
    (r"bn1\.(weight|bias|running_mean|running_var)", "backbone/bn1/{bn0}", "id"),
    (r"layer(\d+)\.(\d+)\.conv(\d)\.weight", "backbone/layer{0}_{1}/conv{2}/kernel", "conv"),
    (r"layer(\d+)\.(\d+)\.bn(\d)\.(weight|bias|running_mean|running_var)",
     "backbone/layer{0}_{1}/bn{2}/{bn3}", "id"),
    (r"layer(\d+)\.(\d+)\.downsample\.0\.weight", "backbone/layer{0}_{1}/downsample_conv/kernel",
     "conv"),
    (r"layer(\d+)\.(\d+)\.downsample\.1\.(weight|bias|running_mean|running_var)",
     "backbone/layer{0}_{1}/downsample_bn/{bn2}", "id"),
]
_MSDA = r"(sampling_offsets|attention_weights|value_proj|output_proj)"
_DINO_RULES = [
    (r"input_proj\.(\d+)\.0\.weight", "input_proj_{0}/conv/kernel", "conv"),
    (r"input_proj\.(\d+)\.0\.bias", "input_proj_{0}/conv/bias", "id"),
    (r"input_proj\.(\d+)\.1\.(weight|bias)", "input_proj_{0}/norm/{norm1}", "id"),
    (r"label_enc\.weight", "label_enc/embedding", "id"),
    (r"transformer\.level_embed", "transformer/level_embed", "id"),
    (r"transformer\.tgt_embed\.weight", "transformer/tgt_embed", "id"),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attn\." + _MSDA + r"\.(weight|bias)",
     "transformer/encoder_layers_{0}/self_attn/{1}/{dense2}", "linear"),
    (r"transformer\.encoder\.layers\.(\d+)\.(linear\d)\.(weight|bias)",
     "transformer/encoder_layers_{0}/{1}/{dense2}", "linear"),
    (r"transformer\.encoder\.layers\.(\d+)\.(norm\d)\.(weight|bias)",
     "transformer/encoder_layers_{0}/{1}/{norm2}", "id"),
    (r"transformer\.decoder\.layers\.(\d+)\.cross_attn\." + _MSDA + r"\.(weight|bias)",
     "transformer/decoder_layers_{0}/cross_attn/{1}/{dense2}", "linear"),
    (r"transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_weight",
     "transformer/decoder_layers_{0}/self_attn/in_proj_kernel", "linear"),
    (r"transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_bias",
     "transformer/decoder_layers_{0}/self_attn/in_proj_bias", "id"),
    (r"transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
     "transformer/decoder_layers_{0}/self_attn/out_proj/{dense1}", "linear"),
    (r"transformer\.decoder\.layers\.(\d+)\.(linear\d)\.(weight|bias)",
     "transformer/decoder_layers_{0}/{1}/{dense2}", "linear"),
    (r"transformer\.decoder\.layers\.(\d+)\.(norm\d)\.(weight|bias)",
     "transformer/decoder_layers_{0}/{1}/{norm2}", "id"),
    (r"transformer\.decoder\.norm\.(weight|bias)", "transformer/decoder_norm/{norm0}", "id"),
    (r"transformer\.decoder\.ref_point_head\.layers\.(\d+)\.(weight|bias)",
     "transformer/ref_point_head/layers_{0}/{dense1}", "linear"),
    (r"transformer\.enc_output\.(weight|bias)", "transformer/enc_output/{dense0}", "linear"),
    (r"transformer\.enc_output_norm\.(weight|bias)", "transformer/enc_output_norm/{norm0}",
     "id"),
    (r"transformer\.enc_out_class_embed\.(weight|bias)",
     "transformer/enc_out_class_embed/{dense0}", "linear"),
    (r"transformer\.enc_out_bbox_embed\.layers\.(\d+)\.(weight|bias)",
     "transformer/enc_out_bbox_embed/layers_{0}/{dense1}", "linear"),
    # Decoder heads, listed once per decoder layer (twice: model and transformer.decoder):
    # per-layer params when the model has them, else the shared pair (the first rule whose
    # path is in the model wins).
    (r"(?:transformer\.decoder\.)?class_embed\.(\d+)\.(weight|bias)",
     "transformer/class_embed_{0}/{dense1}", "linear"),
    (r"(?:transformer\.decoder\.)?bbox_embed\.(\d+)\.layers\.(\d+)\.(weight|bias)",
     "transformer/bbox_embed_{0}/layers_{1}/{dense2}", "linear"),
    (r"(?:transformer\.decoder\.)?class_embed\.\d+\.(weight|bias)",
     "transformer/class_embed/{dense0}", "linear"),
    (r"(?:transformer\.decoder\.)?bbox_embed\.\d+\.layers\.(\d+)\.(weight|bias)",
     "transformer/bbox_embed/layers_{0}/{dense1}", "linear"),
] + [(r"backbone\.0\.body\." + pattern, path, kind) for pattern, path, kind in _BACKBONE_RULES]

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_NORM_NAMES = {"weight": "scale", "bias": "bias"}
_DENSE_NAMES = {"weight": "kernel", "bias": "bias"}
# torchvision checkpoint entries with no counterpart here (classifier, BN step counters).
_TORCHVISION_IGNORED = re.compile(r"(fc\.(weight|bias)|.*num_batches_tracked)$")
SOURCES = ("dino", "torchvision")


def _fill_template(template, groups):
  """Formats a path template; {bnK}/{normK}/{denseK} rename torch group K."""
  def repl(match):
    kind, index = match.group(1), int(match.group(2))
    table = {"bn": _BN_NAMES, "norm": _NORM_NAMES, "dense": _DENSE_NAMES}[kind]
    return table[groups[index]]
  path = re.sub(r"\{(bn|norm|dense)(\d+)\}", repl, template)
  return tuple(path.format(*groups).split("/"))


def _transform(kind, array):
  if kind == "conv" and array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
  if kind == "linear" and array.ndim == 2:
    return array.T  # [out, in] -> [in, out]
  return array


def _flatten(tree, prefix=()) -> Dict[Path, object]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, "items"):
      out.update(_flatten(value, prefix + (str(key),)))
    else:
      out[prefix + (str(key),)] = value
  return out


def _unflatten(flat: Dict[Path, np.ndarray]):
  tree: Dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _map_name(name, source, known=None):
  """(flax path, transform) of a PyTorch tensor name, or None when no rule matches.

  With `known` (a set of model paths), the first matching rule whose path is in it wins;
  failing that, the first matching rule.
  """
  rules = _DINO_RULES if source == "dino" else _BACKBONE_RULES
  first = None
  for pattern, template, kind in rules:
    match = re.fullmatch(pattern, name)
    if match:
      mapped = (_fill_template(template, match.groups()), kind)
      if known is None or mapped[0] in known:
        return mapped
      first = first or mapped
  return first


def _select_class_rows(name, array, class_rows):
  """Keeps the rows of the class-indexed tensors (class heads, label_enc) listed in class_rows.

  DINO's heads are indexed by COCO category id (91 rows); our labels are contiguous, so row k
  of the converted head is checkpoint row `class_rows[k]`. label_enc keeps its extra last row.
  """
  if re.search(r"class_embed(\.\d+)?\.(weight|bias)$", name):
    return array[np.asarray(class_rows)]
  if name.endswith("label_enc.weight"):
    return array[np.concatenate([np.asarray(class_rows), [array.shape[0] - 1]])]
  return array


def convert_state_dict(state_dict, template, *, source="dino", skip_shape_mismatch=False,
                       class_rows=None):
  """Maps a PyTorch state_dict onto the params of `dino.DINO`.

  Args:
    state_dict: {PyTorch name: array-like}. A leading "module." (DDP) is stripped.
    template: the model's params pytree (arrays or `jax.ShapeDtypeStruct`) giving paths and
      shapes.
    source: "dino" (an official DINO checkpoint's `model` dict: every parameter must be
      filled) or "torchvision" (an ImageNet ResNet: every `backbone` parameter must be filled;
      `fc.*` and `num_batches_tracked` are ignored).
    skip_shape_mismatch: leave parameters whose shape differs (e.g. 91-class heads into an
      80-class model) out of the result instead of failing; they keep their init values when
      merged with `merge_params`.
    class_rows: optional checkpoint row index for each of our classes (e.g. the 80 COCO
      category ids, `data.coco.COCO_CATEGORY_IDS`, to turn DINO's 91 category-id rows into 80
      contiguous labels), applied to class_embed, enc_out_class_embed and label_enc.

  Returns:
    Nested dict of float32 numpy arrays: the filled subtree (the whole tree for "dino", only
    `backbone` for "torchvision").

  Raises:
    ValueError: listing unused tensors, unfilled parameters, shape mismatches and differing
      copies of shared heads.
  """
  if source not in SOURCES:
    raise ValueError(f"convert_torch: source must be one of {SOURCES}, got {source!r}")
  shapes = {path: tuple(leaf.shape) for path, leaf in _flatten(template).items()}
  required = {p for p in shapes if source == "dino" or p[0] == "backbone"}
  filled: Dict[Path, np.ndarray] = {}
  origin: Dict[Path, str] = {}
  unused: List[str] = []
  mismatched: List[str] = []
  mismatched_paths = set()
  conflicts: List[str] = []
  for raw_name, value in state_dict.items():
    name = raw_name[len("module."):] if raw_name.startswith("module.") else raw_name
    if source == "torchvision" and _TORCHVISION_IGNORED.fullmatch(name):
      continue
    mapped = _map_name(name, source, shapes.keys())
    if mapped is None or mapped[0] not in shapes:
      unused.append(raw_name)
      continue
    path, kind = mapped
    array = np.asarray(value, dtype=np.float32)
    if class_rows is not None:
      array = _select_class_rows(name, array, class_rows)
    array = _transform(kind, array)
    if array.shape != shapes[path]:
      mismatched.append(f"{raw_name} {tuple(np.shape(value))} -> {'/'.join(path)} "
                        f"{shapes[path]}")
      mismatched_paths.add(path)
      continue
    if path in filled:
      if not np.array_equal(filled[path], array):
        conflicts.append(f"{raw_name} differs from {origin[path]} (both fill "
                         f"{'/'.join(path)})")
      continue
    filled[path] = array
    origin[path] = raw_name
  unfilled = sorted("/".join(p) for p in required - set(filled)
                    if not (skip_shape_mismatch and p in mismatched_paths))
  problems = []
  if unused:
    problems.append(f"{len(unused)} checkpoint tensors unused: {sorted(unused)}")
  if unfilled:
    problems.append(f"{len(unfilled)} params unfilled: {unfilled}")
  if mismatched and not skip_shape_mismatch:
    problems.append(f"{len(mismatched)} shape mismatches: {mismatched}")
  if conflicts:
    problems.append(f"{len(conflicts)} head copies differ: {conflicts}")
  if problems:
    raise ValueError(f"convert_torch ({source}): " + "; ".join(problems))
  return _unflatten(filled)


def merge_params(params, loaded, *, where="loaded weights"):
  """Returns `params` with every leaf present in `loaded` replaced (same shape required).

  Args:
    params: the model's params pytree (nested dicts of arrays).
    loaded: nested dict subset, e.g. from `convert_state_dict` or `load_npz`.
    where: name of the source for error messages.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  flat = _flatten(params)
  updates = _flatten(loaded)
  unknown = sorted("/".join(p) for p in updates if p not in flat)
  bad = sorted(f"{'/'.join(p)} {np.shape(v)} != {tuple(flat[p].shape)}"
               for p, v in updates.items() if p in flat and np.shape(v) != tuple(flat[p].shape))
  if unknown or bad:
    raise ValueError(f"{where}: params not in the model: {unknown}; shape mismatches: {bad}")
  merged = {p: (jnp.asarray(updates[p], flat[p].dtype) if p in updates else v)
            for p, v in flat.items()}
  return _unflatten(merged)


def save_npz(path, tree):
  """Saves a nested dict of arrays as .npz with "/"-joined keys."""
  np.savez(path, **{"/".join(p): np.asarray(v) for p, v in _flatten(tree).items()})


def load_npz(path):
  """Loads a `save_npz` file back into a nested dict of numpy arrays."""
  with np.load(path) as data:
    return _unflatten({tuple(k.split("/")): data[k] for k in data.files})


def merge_pretrained_params(params, model_config):
  """Applies `model_config.pretrained_backbone` then `model_config.pretrained` (.npz paths).

  Either may be empty. Returns the updated params (float32 leaves of the template's dtypes).
  """
  for field in ("pretrained_backbone", "pretrained"):
    path = model_config.get(field, "") if hasattr(model_config, "get") else ""
    if path:
      params = merge_params(params, load_npz(path), where=f"config.model.{field}={path}")
  return params


def read_torch_file(path, *, unsafe_pickle=False):
  """{name: numpy array} from a .pth/.pt (needs torch) or .npz file.

  A DINO checkpoint's weights are under "model"; torchvision files are the state_dict itself.
  `unsafe_pickle` allows full pickle loading (DINO checkpoints also pickle their argparse
  args): only for files you trust.
  """
  if str(path).endswith(".npz"):
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("convert_torch: reading .pth files needs torch "
                      "(pip install torch --index-url https://download.pytorch.org/whl/cpu)"
                      ) from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
  except Exception as e:  # pickle restrictions raise several exception types
    raise ValueError(f"convert_torch: could not load {path} with weights_only=True ({e}); if "
                     f"you trust the file, pass --unsafe_pickle") from e
  if isinstance(obj, dict) and "model" in obj and hasattr(obj["model"], "items"):
    obj = obj["model"]
  return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def params_template(model_config):
  """Abstract params (ShapeDtypeStructs) of `dino.build_dino(model_config)`."""
  from sized_detr_jax import summary  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.models import dino  # pylint: disable=g-import-not-at-top

  model = dino.build_dino(model_config)
  side = summary._example_side(model.num_queries)  # pylint: disable=protected-access
  return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32),
                        jax.ShapeDtypeStruct((1, side, side), jnp.bool_))["params"]


def main(argv: Optional[List[str]] = None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--source", choices=SOURCES, required=True)
  parser.add_argument("--input", required=True, help=".pth/.pt (needs torch) or .npz")
  parser.add_argument("--output", required=True, help=".npz for config.model.pretrained*")
  parser.add_argument("--config", default="dino_r50",
                      help="experiment config file[:arg] giving the model shape")
  parser.add_argument("--skip_shape_mismatch", action="store_true")
  parser.add_argument("--coco_category_rows", action="store_true",
                      help="map DINO's 91 category-id class rows to the 80 contiguous COCO "
                           "labels of the data pipeline")
  parser.add_argument("--unsafe_pickle", action="store_true")
  args = parser.parse_args(argv)
  from sized_detr_jax import config_lib  # pylint: disable=g-import-not-at-top
  path, _, arg = args.config.partition(":")
  config = config_lib.load_config(path, arg or None)
  state_dict = read_torch_file(args.input, unsafe_pickle=args.unsafe_pickle)
  class_rows = None
  if args.coco_category_rows:
    from sized_detr_jax.data.coco import COCO_CATEGORY_IDS  # pylint: disable=g-import-not-at-top
    class_rows = COCO_CATEGORY_IDS
  converted = convert_state_dict(state_dict, params_template(config.model), source=args.source,
                                 skip_shape_mismatch=args.skip_shape_mismatch,
                                 class_rows=class_rows)
  save_npz(args.output, converted)
  count = sum(int(np.prod(v.shape)) for v in _flatten(converted).values())
  print(f"convert_torch: wrote {len(_flatten(converted))} arrays ({count} values) to "
        f"{args.output}")


if __name__ == "__main__":
  main()
