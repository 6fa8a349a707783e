"""The official PyTorch DINO-4scale R50 (IDEA-Research/DINO) next to this package's DINO.

Shared by the opt-in conformance test (tests/test_conformance_torch.py) and the side-by-side
benchmark (`benchmarks.vs_pytorch`). Nothing here imports torch at module import time: the
torch half (`build_official`, `run_official`, ...) needs torch, torchvision and the small
packages DINO imports (timm, termcolor; `pip install torch torchvision timm termcolor`), and a
checkout of https://github.com/IDEA-Research/DINO (`dino_src`); the JAX half
(`injected_selection`, `injected_denoising`, `converted_params`) needs neither.

Official model: `build_official(dino_src)` reads `config/DINO/DINO_4scale.py` (and its
`_base_`) into DINO's argparse namespace, builds it with DINO's own `build_dino` (model and
SetCriterion), random-initialises it under `torch.manual_seed(seed)` (no ImageNet download:
DINO's `is_main_process()` check that triggers it is patched to False) and adds N(0,
`noise_std`) to every parameter and FrozenBatchNorm buffer, so that layers DINO initialises
to zero (sampling offsets, attention weights, last box-MLP layers) are exercised. Nothing in
`dino_src` is edited; the patches live in this process only:

* MSDA: DINO imports its compiled CUDA op (`MultiScaleDeformableAttention`) unconditionally.
  Where it is missing (or on the CPU, where it has no kernel) a stub module satisfies the
  import and `MSDeformAttn` calls DINO's own pure-PyTorch `ms_deform_attn_core_pytorch`
  (`F.grid_sample`, bilinear, zero padding; the same sampling as the CUDA op) instead.
* `.cuda()` / `.to('cuda')`: DINO's denoising (`prepare_for_cdn`) and SetCriterion hard-code
  CUDA; on the CPU `cpu_cuda_calls()` maps them to the CPU while the official code runs.

Conversion: `numpy_state_dict(model)` -> `converted_params(state_dict, model_config)`, i.e.
`convert_torch.convert_state_dict` onto `experiments/dino_r50.py:coco91` (DINO's 91 category-id
classes: labels are used as is on both sides).

Side by side: `run_official` returns DINO's outputs plus what DINO decided internally (the
top-Q encoder tokens it selected, its noised denoising labels/boxes and its Hungarian matches);
`injected_selection` / `injected_denoising` make this package's model use the same ones, so
its outputs can be compared element by element.
"""
import argparse
import contextlib
import os
import sys
import types
from typing import Any, Dict, List, Optional

import numpy as np

CONFIG_4SCALE = os.path.join("config", "DINO", "DINO_4scale.py")
JAX_CONFIG = ("dino_r50", "coco91")


# ---------------------------------------------------------------------------------------------
# The official model (torch).


def _exec_config(path, namespace):
  """Executes a DINO config file (its `_base_` files first) into `namespace`."""
  with open(path, encoding="utf-8") as f:
    code = f.read()
  local: Dict[str, Any] = {}
  exec(compile(code, path, "exec"), {}, local)  # pylint: disable=exec-used
  for base in local.get("_base_", []):
    _exec_config(os.path.join(os.path.dirname(path), base), namespace)
  namespace.update({k: v for k, v in local.items() if not k.startswith("_")})


def load_args(dino_src, config=CONFIG_4SCALE, **overrides) -> argparse.Namespace:
  """DINO's argument namespace for `config` (relative to dino_src), as main.py builds it.

  Only the fields DINO's model builders read are added to the config file's values: device
  ("cpu" unless overridden), dataset_file ("coco"), seed.
  """
  path = os.path.join(dino_src, config)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"official_dino: {path} not found (dino_src must be a checkout of "
                            f"IDEA-Research/DINO)")
  values = {"device": "cpu", "dataset_file": "coco", "seed": 42}
  _exec_config(path, values)
  values.update(overrides)
  return argparse.Namespace(**values)


def _import_official(dino_src, device):
  """Imports DINO's `models` package from dino_src with the in-process patches (docstring)."""
  import torch  # pylint: disable=g-import-not-at-top

  src = os.path.abspath(dino_src)
  loaded = sys.modules.get("models")
  if loaded is not None:
    if os.path.dirname(os.path.dirname(os.path.abspath(loaded.__file__))) != src:
      raise RuntimeError(f"official_dino: a different `models` package is already imported "
                         f"({loaded.__file__}); use one dino_src per process")
  if src not in sys.path:
    sys.path.insert(0, src)
  try:
    import MultiScaleDeformableAttention  # pylint: disable=g-import-not-at-top,unused-import
    have_op = True
  except ImportError:
    sys.modules["MultiScaleDeformableAttention"] = types.ModuleType(
        "MultiScaleDeformableAttention")
    have_op = False
  from models.dino import backbone as dino_backbone  # pylint: disable=g-import-not-at-top
  from models.dino import dino as dino_module  # pylint: disable=g-import-not-at-top
  from models.dino.ops.functions import ms_deform_attn_func  # pylint: disable=g-import-not-at-top
  from models.dino.ops.modules import ms_deform_attn  # pylint: disable=g-import-not-at-top
  from util import misc  # pylint: disable=g-import-not-at-top

  # No ImageNet download: DINO passes pretrained=is_main_process() to torchvision's resnet50.
  dino_backbone.is_main_process = lambda: False
  use_op = have_op and torch.device(device).type == "cuda"
  if not use_op:
    core = ms_deform_attn_func.ms_deform_attn_core_pytorch

    class PyTorchMSDA:  # same call signature as DINO's MSDeformAttnFunction.apply
      @staticmethod
      def apply(value, spatial_shapes, level_start_index, locations, weights, im2col_step):
        del level_start_index, im2col_step
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        return core(value, shapes, locations, weights)

    ms_deform_attn.MSDeformAttnFunction = PyTorchMSDA
  return types.SimpleNamespace(dino=dino_module, misc=misc, msda="cuda op" if use_op else
                               "ms_deform_attn_core_pytorch")


@contextlib.contextmanager
def cpu_cuda_calls(device):
  """While active, `Tensor.cuda()` / `.to('cuda')` stay on `device` when it is not a GPU."""
  import torch  # pylint: disable=g-import-not-at-top

  device = torch.device(device)
  if device.type == "cuda":
    yield
    return
  original_cuda, original_to = torch.Tensor.cuda, torch.Tensor.to

  def is_cuda(x):
    return (isinstance(x, str) and x.startswith("cuda")) or (
        isinstance(x, torch.device) and x.type == "cuda")

  def to(self, *args, **kwargs):
    args = tuple(device if is_cuda(a) else a for a in args)
    if is_cuda(kwargs.get("device")):
      kwargs["device"] = device
    return original_to(self, *args, **kwargs)

  torch.Tensor.cuda = lambda self, *args, **kwargs: original_to(self, device)
  torch.Tensor.to = to
  try:
    yield
  finally:
    torch.Tensor.cuda, torch.Tensor.to = original_cuda, original_to


class Official(types.SimpleNamespace):
  """The built official model: `model`, `criterion` (DINO's SetCriterion), `args`,
  `postprocessors`, `device` (torch.device), `msda` (which MSDA ran) and `api` (DINO modules)."""


def build_official(dino_src, *, seed=0, noise_std=0.02, device="cpu", config=CONFIG_4SCALE,
                   **overrides) -> Official:
  """Builds DINO-4scale R50 from dino_src: seeded random init + N(0, noise_std) perturbation.

  Args:
    dino_src: checkout of IDEA-Research/DINO.
    seed: torch seed of the initialisation and of the perturbation.
    noise_std: std of the Gaussian added to every parameter and FrozenBatchNorm buffer
      (running_var stays positive for noise_std << 1).
    device: "cpu" or "cuda".
    config, overrides: DINO config file (relative to dino_src) and field overrides.

  Returns:
    `Official` with the model in eval mode.
  """
  import torch  # pylint: disable=g-import-not-at-top

  api = _import_official(dino_src, device)
  args = load_args(dino_src, config, device=str(device), **overrides)
  torch.manual_seed(seed)
  with cpu_cuda_calls(device):
    model, criterion, postprocessors = api.dino.build_dino(args)
  generator = torch.Generator().manual_seed(seed + 1)
  seen = set()  # shared heads appear under several names: perturb each tensor once
  with torch.no_grad():
    for _, tensor in sorted(model.state_dict(keep_vars=True).items()):
      if tensor.dtype.is_floating_point and id(tensor) not in seen:
        seen.add(id(tensor))
        tensor.add_(noise_std * torch.randn(tensor.shape, generator=generator,
                                            dtype=tensor.dtype))
  model.to(device).eval()
  criterion.to(device)
  return Official(model=model, criterion=criterion, postprocessors=postprocessors, args=args,
                  device=torch.device(device), msda=api.msda, api=api)


def numpy_state_dict(model) -> Dict[str, np.ndarray]:
  """{PyTorch name: float32 numpy array} of every parameter and buffer (duplicates included)."""
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def load_numpy_state_dict(model, state_dict):
  """Loads `numpy_state_dict`'s output (e.g. from an .npz) into `model` (strict)."""
  import torch  # pylint: disable=g-import-not-at-top

  device = next(model.parameters()).device
  model.load_state_dict({k: torch.as_tensor(np.asarray(v), device=device)
                         for k, v in state_dict.items()}, strict=True)


def torch_samples(official, images, pixel_mask):
  """DINO's NestedTensor from this package's batch arrays.

  Args:
    images: [B, H, W, 3] float32 (normalised, zero padding); pixel_mask: [B, H, W] bool, True
      on real pixels.
  """
  import torch  # pylint: disable=g-import-not-at-top

  tensors = torch.as_tensor(np.ascontiguousarray(np.transpose(images, (0, 3, 1, 2))),
                            device=official.device)
  mask = torch.as_tensor(~np.asarray(pixel_mask, bool), device=official.device)
  return official.api.misc.NestedTensor(tensors, mask)


def torch_targets(official, boxes, labels, valid):
  """DINO's list of per-image target dicts ({labels int64 [n], boxes [n, 4] cxcywh})."""
  import torch  # pylint: disable=g-import-not-at-top

  out = []
  for b in range(len(boxes)):
    keep = np.asarray(valid[b], bool)
    out.append({"labels": torch.as_tensor(np.asarray(labels[b])[keep].astype(np.int64),
                                          device=official.device),
                "boxes": torch.as_tensor(np.asarray(boxes[b], np.float32)[keep],
                                         device=official.device)})
  return out


class _Recorder:
  """Records DINO's internal decisions during one `run_official` call."""

  def __init__(self, official):
    self.official = official
    self.enc_logits = None
    self.dn_labels = None
    self.dn_boxes_unsigmoid = None
    self.matches: List[Any] = []

  @contextlib.contextmanager
  def active(self):
    official = self.official
    model = official.model
    transformer = model.transformer
    handles = [transformer.enc_out_class_embed.register_forward_hook(self._enc_hook),
               official.criterion.matcher.register_forward_hook(self._match_hook)]
    dino_module = official.api.dino
    original_cdn = dino_module.prepare_for_cdn

    def prepare_for_cdn(dn_args, training, num_queries, num_classes, hidden_dim, label_enc):
      seen = []

      def recording_label_enc(m):
        seen.append(m.detach().cpu().numpy())
        return label_enc(m)

      label, box, attn_mask, meta = original_cdn(dn_args, training, num_queries, num_classes,
                                                 hidden_dim, recording_label_enc)
      if training:
        self._store_dn(dn_args[0], seen[0], box, meta)
      return label, box, attn_mask, meta

    dino_module.prepare_for_cdn = prepare_for_cdn
    try:
      yield self
    finally:
      dino_module.prepare_for_cdn = original_cdn
      for h in handles:
        h.remove()

  def _enc_hook(self, module, inputs, output):
    del module, inputs
    # Called twice per forward: on the S encoder tokens (selection), then on the Q selected.
    if self.enc_logits is None:
      self.enc_logits = output.detach()

  def _match_hook(self, module, inputs, output):
    del module, inputs
    self.matches.append([(i.cpu().numpy(), j.cpu().numpy()) for i, j in output])

  def _store_dn(self, targets, flat_labels, boxes_unsig, meta):
    """DINO's noised labels [B, P] and boxes [B, P, 4] (unsigmoided) per denoising slot."""
    counts = [len(t["labels"]) for t in targets]
    pad, groups = meta["pad_size"], meta["num_dn_group"]
    single = pad // groups // 2  # DINO's single_pad: the batch's largest box count
    labels = np.zeros((len(counts), pad), np.int64)
    total, offsets = sum(counts), np.cumsum([0] + counts)
    for copy in range(2 * groups):
      for b, n in enumerate(counts):
        start = copy * total + offsets[b]
        labels[b, copy * single:copy * single + n] = flat_labels[start:start + n]
    self.dn_labels = labels
    self.dn_boxes_unsigmoid = boxes_unsig.detach().cpu().numpy()

  def topk(self):
    """DINO's selected encoder tokens [B, Q] (its own torch.topk on the recorded logits)."""
    import torch  # pylint: disable=g-import-not-at-top
    q = self.official.model.num_queries
    return torch.topk(self.enc_logits.max(-1)[0], q, dim=1)[1].cpu().numpy().astype(np.int32)


def _outputs_numpy(out):
  """DINO's output dict -> {pred_logits/pred_boxes [L, B, Q, ...], interm_*} numpy."""
  layers = out.get("aux_outputs", []) + [{"pred_logits": out["pred_logits"],
                                          "pred_boxes": out["pred_boxes"]}]
  result = {"logits": np.stack([o["pred_logits"].detach().cpu().numpy() for o in layers]),
            "boxes": np.stack([o["pred_boxes"].detach().cpu().numpy() for o in layers])}
  if "interm_outputs" in out:
    result["interm_logits"] = out["interm_outputs"]["pred_logits"].detach().cpu().numpy()
    result["interm_boxes"] = out["interm_outputs"]["pred_boxes"].detach().cpu().numpy()
  meta = out.get("dn_meta")
  if meta and "output_known_lbs_bboxes" in meta:
    known = meta["output_known_lbs_bboxes"]
    dn_layers = known.get("aux_outputs", []) + [known]
    result["dn_logits"] = np.stack([o["pred_logits"].detach().cpu().numpy() for o in dn_layers])
    result["dn_boxes"] = np.stack([o["pred_boxes"].detach().cpu().numpy() for o in dn_layers])
  return result


def run_official(official, images, pixel_mask, targets=None, *, train=False, seed=0):
  """Runs DINO (eval: no_grad forward; train: forward + SetCriterion) on a padded batch.

  Args:
    official: `build_official`'s result.
    images: [B, H, W, 3] float32; pixel_mask: [B, H, W] bool (True = real pixel).
    targets: (boxes [B, G, 4] normalised cxcywh, labels [B, G], valid [B, G]) numpy; needed
      for train.
    train: training forward (denoising queries) and DINO's SetCriterion.
    seed: torch seed of the denoising noise.

  Returns:
    dict of numpy arrays: `logits` [L, B, Q, C], `boxes` [L, B, Q, 4] (every decoder layer),
    `interm_logits`, `interm_boxes`, `topk` [B, Q] int32 (the selected encoder tokens); with
    train also `dn_logits`, `dn_boxes` [L, B, P, ...], `dn_labels` [B, P], `dn_boxes_unsigmoid`
    [B, P, 4] (DINO's denoising inputs), `losses` {DINO loss name: float}, `weights` (DINO's
    weight_dict), `matches` (list over final, aux 0.., interm of per-image (query, gt) index
    arrays).
  """
  import torch  # pylint: disable=g-import-not-at-top

  model, criterion = official.model, official.criterion
  samples = torch_samples(official, images, pixel_mask)
  recorder = _Recorder(official)
  with recorder.active(), cpu_cuda_calls(official.device):
    if train:
      torch.manual_seed(seed)
      model.train()
      criterion.train()
      dino_targets = torch_targets(official, *targets)
      out = model(samples, dino_targets)
      loss_dict = criterion(out, dino_targets)
      model.eval()
    else:
      with torch.no_grad():
        out = model(samples)
  result = _outputs_numpy(out)
  result["topk"] = recorder.topk()
  if train:
    result["losses"] = {k: float(v) for k, v in loss_dict.items()}
    result["weights"] = dict(criterion.weight_dict)
    result["matches"] = recorder.matches
    result["dn_labels"] = recorder.dn_labels
    result["dn_boxes_unsigmoid"] = recorder.dn_boxes_unsigmoid
  return result


def dino_loss_name(name):
  """DINO's loss name -> this package's (`loss_ce_3` -> `loss_ce_aux_3`, `loss_ce_dn_3` ->
  `loss_ce_dn_aux_3`; `_dn`, `_interm` and final names are the same)."""
  head, _, tail = name.rpartition("_")
  if tail.isdigit():
    return f"{head}_aux_{tail}"
  return name


# ---------------------------------------------------------------------------------------------
# This package's side (JAX): conversion and injection of DINO's decisions.


def jax_model_config(config=JAX_CONFIG):
  """The `dino_r50:coco91` config (model section: query_selection "dino")."""
  from sized_detr_jax import config_lib  # pylint: disable=g-import-not-at-top
  path, arg = config
  return config_lib.load_config(path, arg)


def converted_params(state_dict, model_config):
  """convert_torch's params (nested dict of float32 numpy) for `dino.build_dino(model_config)`."""
  from sized_detr_jax import convert_torch  # pylint: disable=g-import-not-at-top
  return convert_torch.convert_state_dict(state_dict, convert_torch.params_template(model_config),
                                          source="dino")


@contextlib.contextmanager
def injected_selection(topk_index, use=True, record=None):
  """While tracing inside it, the model's query selection takes `topk_index` (in order).

  Patches `deformable_transformer.selection_scores` (looked up at trace time, so enter this
  inside the jitted function): the selected tokens score Q, Q-1, ..., 1 (their order), the rest
  -inf; with `use` False (a traced bool is fine) the model's own scores are returned.

  Args:
    topk_index: [B, Q] int32 encoder-token indices (e.g. `run_official(...)["topk"]`).
    use: bool or traced [] bool.
    record: optional dict that receives the traced `scores` [B, S] (the model's own) and
      `usable` [B, S] of the last call (return them from the jitted function to see them).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.models import deformable_transformer  # pylint: disable=g-import-not-at-top

  dt = deformable_transformer
  original = dt.selection_scores

  def scores(enc_logits, usable, rule):
    natural = original(enc_logits, usable, rule)
    if record is not None:
      record.update(scores=natural, usable=usable)
    b, q = topk_index.shape
    rank = jnp.broadcast_to(jnp.arange(q, 0, -1, dtype=jnp.float32), (b, q))
    forced = jnp.full(natural.shape, -jnp.inf, jnp.float32).at[
        jnp.arange(b)[:, None], topk_index].set(rank)
    return jnp.where(use, forced, natural)

  dt.selection_scores = scores
  try:
    yield
  finally:
    dt.selection_scores = original


@contextlib.contextmanager
def injected_denoising(labels, boxes_unsigmoid):
  """While tracing inside it, the first P denoising slots take DINO's noised labels and boxes.

  DINO lays out denoising per batch (groups of [n positives, n negatives] padded to the
  batch's largest box count n); this package per image. With the same box count in every
  image the two layouts coincide slot for slot, so only the noise (labels [B, P], unsigmoided
  boxes [B, P, 4]) has to be copied; `dn_meta["valid"]` of the outputs tells which slots were
  real (check it is True exactly on [:P]).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.models import denoising  # pylint: disable=g-import-not-at-top

  original = denoising.build_denoising_queries

  def build(*args, **kwargs):
    out = dict(original(*args, **kwargs))
    p = labels.shape[1]
    valid = out["valid"][:, :p]
    out["labels"] = out["labels"].at[:, :p].set(
        jnp.where(valid, labels.astype(jnp.int32), 0))
    out["boxes_unsigmoid"] = out["boxes_unsigmoid"].at[:, :p].set(
        jnp.where(valid[..., None], boxes_unsigmoid.astype(jnp.float32), 0.0))
    return out

  denoising.build_denoising_queries = build
  try:
    yield
  finally:
    denoising.build_denoising_queries = original


def jax_outputs_numpy(outputs):
  """This package's outputs -> the layout of `run_official`'s (`logits` [L, B, Q, C], ...)."""
  layers = list(outputs.get("aux_outputs", [])) + [outputs]
  result = {"logits": np.stack([np.asarray(o["pred_logits"]) for o in layers]),
            "boxes": np.stack([np.asarray(o["pred_boxes"]) for o in layers]),
            "interm_logits": np.asarray(outputs["interm_outputs"]["pred_logits"]),
            "interm_boxes": np.asarray(outputs["interm_outputs"]["pred_boxes"])}
  if "dn_outputs" in outputs:
    result["dn_logits"] = np.asarray(outputs["dn_outputs"]["pred_logits"])
    result["dn_boxes"] = np.asarray(outputs["dn_outputs"]["pred_boxes"])
  return result


def max_abs_diffs(ours, theirs, keys=("logits", "boxes", "interm_logits", "interm_boxes")):
  """{key: max |ours - theirs|} over the keys both have (dn arrays cut to DINO's P slots)."""
  out = {}
  for key in keys:
    if key in ours and key in theirs:
      a, b = np.asarray(ours[key]), np.asarray(theirs[key])
      if key.startswith("dn_"):
        a = a[..., :b.shape[-2], :]
      out[key] = float(np.max(np.abs(a - b)))
  return out


def make_batch(sizes, *, batch=2, boxes_per_image=5, num_classes=91, seed=0):
  """A padded batch of random images and equal-count random boxes (this package's contract).

  Args:
    sizes: list of (H, W) real image sizes; image i has sizes[i % len(sizes)]; padded to the
      largest H and W.
    batch, boxes_per_image: B and the number of valid boxes per image (G = boxes_per_image).
    num_classes: labels are drawn from [1, num_classes) (COCO category ids when 91).

  Returns:
    dict of numpy arrays: image f32 [B, H, W, 3] (N(0, 1) on real pixels, 0 padding),
    pixel_mask bool [B, H, W], boxes f32 [B, G, 4] normalised cxcywh, labels i32 [B, G],
    valid bool [B, G], image_id i32 [B], orig_size / size i32 [B, 2].
  """
  rng = np.random.default_rng(seed)
  real = [tuple(sizes[i % len(sizes)]) for i in range(batch)]
  h, w = max(s[0] for s in real), max(s[1] for s in real)
  image = np.zeros((batch, h, w, 3), np.float32)
  mask = np.zeros((batch, h, w), bool)
  for i, (hi, wi) in enumerate(real):
    image[i, :hi, :wi] = rng.normal(size=(hi, wi, 3))
    mask[i, :hi, :wi] = True
  g = boxes_per_image
  wh = rng.uniform(0.05, 0.5, (batch, g, 2))
  centre = rng.uniform(wh / 2, 1 - wh / 2)
  sizes_arr = np.asarray(real, np.int32)
  return {"image": image, "pixel_mask": mask,
          "boxes": np.concatenate([centre, wh], -1).astype(np.float32),
          "labels": rng.integers(1, num_classes, (batch, g)).astype(np.int32),
          "valid": np.ones((batch, g), bool), "image_id": np.arange(batch, dtype=np.int32),
          "orig_size": sizes_arr, "size": sizes_arr.copy()}


def matches_from_official(official_matches, num_gt):
  """DINO's per-image (query, gt) pairs -> [N, B, G] int32 query per gt column (-1 none)."""
  out = np.full((len(official_matches), len(official_matches[0]), num_gt), -1, np.int32)
  for n, per_image in enumerate(official_matches):
    for b, (query, gt) in enumerate(per_image):
      out[n, b, gt] = query
  return out


def describe(official: Optional[Official]) -> str:
  """One line naming the official build (for logs)."""
  if official is None:
    return "official DINO: not built"
  n = sum(p.numel() for p in official.model.parameters())
  return (f"official DINO-4scale R50: {n:,} params, MSDA {official.msda}, device "
          f"{official.device}")


def jax_eval_fn(model):
  """Jitted eval forward `(params, images, pixel_mask, topk [B, Q], use_topk []) -> (outputs,
  selection)`: with use_topk the query selection is `topk` (`injected_selection`), else the
  model's own; `selection` holds the model's own choice whichever was used: `own_topk` [B, Q]
  int32, `scores` [B, S] float32 (`deformable_transformer.selection_scores`), `usable` [B, S]."""
  import jax  # pylint: disable=g-import-not-at-top

  @jax.jit
  def forward(params, images, pixel_mask, topk, use_topk):
    record = {}
    with injected_selection(topk, use_topk, record):
      outputs = model.apply({"params": params}, images, pixel_mask)
    own = jax.lax.top_k(record["scores"], model.num_queries)[1]  # the model's own rule
    return outputs, {"own_topk": own, "scores": record["scores"], "usable": record["usable"]}

  return forward


def jax_train_losses_fn(model, criterion_config):
  """Jitted training forward + this package's criterion with DINO's decisions injected.

  `(params, batch, topk [B, Q], dn_labels [B, P], dn_boxes_unsigmoid [B, P, 4], key) ->
  (outputs, matches, losses)`: the selection is `topk`, the first P denoising slots take DINO's
  noise, the matches are this package's own Hungarian matching (`criterion.compute_matches`)
  and the losses `criterion.set_criterion`'s.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from sized_detr_jax import criterion  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.data import batch as batch_lib  # pylint: disable=g-import-not-at-top

  @jax.jit
  def step(params, batch, topk, dn_labels, dn_boxes_unsigmoid, key):
    targets = batch_lib.model_targets(batch)
    with injected_selection(topk), injected_denoising(dn_labels, dn_boxes_unsigmoid):
      outputs = model.apply({"params": params}, batch_lib.model_images(batch),
                            batch["pixel_mask"], targets=targets, train=True, rngs={"dn": key})
    matches = criterion.compute_matches(outputs, targets, criterion_config)
    return outputs, matches, criterion.set_criterion(outputs, targets, matches,
                                                     criterion_config)

  return step


def compare_selection(own_topk, dino_topk, scores, usable):
  """How this model's own top-Q tokens compare with DINO's (both [B, Q], in score order).

  Unusable tokens (padding, border anchors) are interchangeable (same zeroed memory, box
  (1, 1, 1, 1)), so a selected one counts as "unusable", not by index.

  Args:
    own_topk, dino_topk: [B, Q] int token indices; scores: [B, S] this model's selection scores;
    usable: [B, S] bool.

  Returns:
    dict: `unusable_ours` / `unusable_dino` (lists, per image), `positions_differing` (list:
    query positions whose token differs, unusable ones counted equal), `max_score_gap` (the
    largest |score(ours) - score(DINO's)| at one position, under this model's scores: 0 when
    the choices are the same, tiny when only near-tied tokens swapped places) and
    `usable_sets_equal` (list of bool).
  """
  own, theirs = np.asarray(own_topk), np.asarray(dino_topk)
  scores, usable = np.asarray(scores), np.asarray(usable, bool)
  rows = np.arange(own.shape[0])[:, None]
  own_usable, their_usable = usable[rows, own], usable[rows, theirs]
  key = lambda index, ok: np.where(ok, index, -1)
  gap = np.abs(scores[rows, own] - scores[rows, theirs])
  return {
      "unusable_ours": (~own_usable).sum(1).tolist(),
      "unusable_dino": (~their_usable).sum(1).tolist(),
      "positions_differing": (key(own, own_usable) != key(theirs, their_usable)).sum(1).tolist(),
      "max_score_gap": float(gap.max()),
      "usable_sets_equal": [set(o[u].tolist()) == set(t[v].tolist()) for o, u, t, v in
                            zip(own, own_usable, theirs, their_usable)],
  }
