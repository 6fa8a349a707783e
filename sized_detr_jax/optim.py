"""AdamW with DINO's parameter groups, gradient clipping and a step-wise learning-rate schedule.

DINO-4scale (IDEA-Research/DINO, `param_dict_type='default'` in util/get_param_dicts.py) trains
two groups: the backbone at `lr_backbone` (lr x 0.1) and the rest at lr; Deformable-DETR's
recipe (`'ddetr_in_mmdet'`) adds a third, the deformable attention `sampling_offsets` and
`reference_points` projections at lr x `lr_linear_proj_mult` (0.1; 1.0 merges it into the rest,
as experiments/dino_r50.py does). Weight decay 1e-4 on all of them (norms and biases included);
global-norm clipping at 0.1; lr x 0.1 at the drop step(s).
Frozen parameters (ResNet stem, layer1, frozen BatchNorm) have their gradients zeroed before
clipping (so they do not count in the norm, like PyTorch's requires_grad=False) and a
multiplier of 0: no update, no decay. Groups come from the model (`dino.param_labels`).

A multiplier on the final AdamW update scales the Adam term and the decoupled weight decay
together, which is exactly PyTorch's per-group lr in AdamW.
"""
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def lr_schedule(opt_config):
  """Schedule step -> lr: lr x factor from each of `lr_drop_steps` on (step >= s), times a linear
  warm-up step / warmup_steps while step < warmup.

  The drop steps are absolute (`optax.join_schedules` would shift them by the warm-up length).
  """
  for field in ("lr_drop_steps", "warmup_steps"):
    if field in opt_config and opt_config[field] is None:
      raise ValueError(f"config.optimizer.{field} is unresolved (None): finalise the config "
                       "with config_lib.finalize (its fraction x total_steps)")
  base = float(opt_config.lr)
  factor = float(opt_config.get("lr_drop_factor", 0.1))
  drops = tuple(int(s) for s in opt_config.get("lr_drop_steps", ()))
  warmup = int(opt_config.get("warmup_steps", 0))
  ramp = optax.linear_schedule(0.0, base, warmup) if warmup > 0 else None

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    lr = jnp.asarray(base, jnp.float32)
    for s in drops:
      lr = jnp.where(step >= s, lr * factor, lr)
    if warmup > 0:
      # optax's linear ramp (its float rounding, so runs measured before the drop-step fix
      # reproduce bit for bit), then the absolute drops.
      lr = jnp.where(step < warmup, ramp(step) * (lr / base), lr)
    return lr

  return schedule


GROUPS = ("frozen", "backbone", "linear_proj", "default")


def effective_labels(labels, opt_config):
  """Group labels after config: `train_all_backbone=True` trains the "frozen" group (ResNet
  stem, layer1, frozen-BN affine/statistics) as "backbone", for training from scratch (no
  ImageNet weights to keep)."""
  if opt_config.get("train_all_backbone", False):
    return jax.tree.map(lambda label: "backbone" if label == "frozen" else label, labels)
  return labels


def group_lr_multipliers(opt_config):
  """{group: lr multiplier}: frozen -> 0, backbone -> `lr_backbone_mult` (0.1), linear_proj ->
  `lr_linear_proj_mult` (0.1), default -> 1."""
  return {"frozen": 0.0, "backbone": float(opt_config.get("lr_backbone_mult", 0.1)),
          "linear_proj": float(opt_config.get("lr_linear_proj_mult", 0.1)), "default": 1.0}


def param_lr_multipliers(labels, opt_config):
  """Per-leaf lr multiplier tree from a tree of group labels (e.g. `dino.param_labels`), by
  `group_lr_multipliers`."""
  mult = group_lr_multipliers(opt_config)
  def lookup(label):
    if label not in mult:
      raise ValueError(f"unknown parameter group {label!r}; known: {GROUPS}")
    return mult[label]
  return jax.tree.map(lookup, labels)


def zero_frozen(labels):
  """GradientTransformation zeroing the updates of "frozen" leaves (before clipping, so frozen
  gradients do not count in the global norm, as PyTorch's requires_grad=False params)."""
  keep = jax.tree.map(lambda label: label != "frozen", labels)
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, k: u if k else jnp.zeros_like(u), updates, keep), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def _decay_mask(params, opt_config):
  """True where weight decay applies (all params, or not norms/biases if configured)."""
  if opt_config.get("decay_norm_and_bias", True):
    return jax.tree.map(lambda _: True, params)
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {path: p.ndim > 1 for path, p in flat.items()})


def scale_by_tree(multipliers):
  """GradientTransformation multiplying each update leaf by a fixed float."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def make_optimizer(params, labels, opt_config):
  """optax chain: zero frozen -> clip global norm -> AdamW(schedule) -> group lr multipliers.

  Args:
    params: the params pytree (only its structure and leaf ndims are read; abstract is fine).
    labels: pytree like params of group names (`GROUPS`), e.g. from `dino.param_labels`.
    opt_config: ConfigDict with lr, weight_decay, clip_norm, betas (optional), lr_drop_steps,
      lr_drop_factor, warmup_steps, lr_backbone_mult, lr_linear_proj_mult,
      decay_norm_and_bias, train_all_backbone.

  Returns:
    (tx, schedule).
  """
  schedule = lr_schedule(opt_config)
  labels = effective_labels(labels, opt_config)
  b1, b2 = opt_config.get("betas", (0.9, 0.999))
  chain = [zero_frozen(labels)]
  if opt_config.get("clip_norm", 0.1):
    chain.append(optax.clip_by_global_norm(float(opt_config.clip_norm)))
  chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=1e-8,
                           weight_decay=float(opt_config.get("weight_decay", 1e-4)),
                           mask=_decay_mask(params, opt_config)))
  chain.append(scale_by_tree(param_lr_multipliers(labels, opt_config)))
  return optax.chain(*chain), schedule
