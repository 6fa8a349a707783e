"""Loading experiment configs by name or path (as ml_collections' config_flags does), finalising
them (`finalize`: derived fields resolved) and validating them (`validate_config`)."""
import copy
import importlib.util
import math
import os

import numpy as np

from sized_detr_jax import configs


def load_config_module(path):
  """Import a config file by path, or a packaged config by name, and return the module (which
  defines `get_config(arg)`)."""
  path = configs.resolve(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file not found: {path} (packaged configs: "
                            f"{', '.join(configs.NAMES)})")
  name = "config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_tokens(arg, known, source):
  """Comma-separated variant tokens of `get_config(arg)`; unknown ones raise one clear error.

  Args:
    arg: the config argument ("a,b" or None).
    known: the tokens the config file accepts.
    source: the config's name for the message (e.g. "synthetic").

  Returns:
    list of tokens in order.
  """
  tokens = [t for t in (arg or "").split(",") if t]
  unknown = [t for t in tokens if t not in known]
  if unknown:
    raise ValueError(f"{source}: unknown variant tokens {unknown}; known: {tuple(known)}")
  return tokens


def check_choice(name, value, choices):
  """Raises ValueError("<name> must be one of <choices>, got <value>") unless value in choices."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def section_fields(section, known, name):
  """A config section (ConfigDict, dict or None) as a plain dict, its keys checked.

  Args:
    section: e.g. `config.criterion`; None is empty.
    known: the accepted field names.
    name: the section's name for the message (e.g. "config.criterion").

  Raises:
    ValueError: unknown fields, named with the known ones.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  given = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(
      section or {})
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise ValueError(f"{name}: unknown fields {unknown}; known: {sorted(known)}")
  return given


def load_config(path, arg=None):
  """`get_config(arg)` of the config file at `path`, or of the packaged config named `path`."""
  return load_config_module(path).get_config(arg)


def add_trainer_fields(config, *, name, total_steps, log_every=100, checkpoint_every=1000,
                       eval_every=0):
  """The fields `train.py` reads, with defaults, so every experiment has the same knobs.

  Fields: name, seed, total_steps, log_every, checkpoint_every (0: only at the end),
  keep_checkpoints, eval_every (0: only at the end), eval_at_end, num_devices (0: all),
  ema_momentum (None: no EMA params), eval_ema, log_grad_split (log the gradient norm of each
  loss kind and the share of clipped steps), init_from (a fresh run starts its detector from
  another run's newest checkpoint, e.g. a supervised burn-in), distributed
  (jax.distributed.initialize args, incl. heartbeat_timeout_seconds), split_step (the train
  step as two jitted executables with the host matching between them, `split_step.SplitStep`:
  no host callback, so the compilation cache keeps it; True / False, or None (the default):
  split where its executables are kept, i.e. one process with the persistent compilation cache
  on, else the one-executable step with the host callback, which compiles faster).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  config.name = name
  config.seed = 0
  config.total_steps = int(total_steps)
  config.log_every = int(log_every)
  config.checkpoint_every = int(checkpoint_every)
  config.keep_checkpoints = 3
  config.eval_every = int(eval_every)
  config.eval_at_end = True
  config.num_devices = 0
  config.ema_momentum = config_dict.placeholder(float)
  config.eval_ema = False
  config.log_grad_split = False
  config.init_from = ""
  config.split_step = config_dict.placeholder(bool)
  config.distributed = ml_collections.ConfigDict(dict(
      enabled=False,
      coordinator_address=config_dict.placeholder(str),
      num_processes=config_dict.placeholder(int),
      process_id=config_dict.placeholder(int),
      # Seconds without a heartbeat after which the coordination service declares a process
      # dead and stops the others (jax.distributed's default 100 when unset).
      heartbeat_timeout_seconds=config_dict.placeholder(int),
      # Training: seconds without news from a process after which the others stop with one
      # line naming it (peer_watch; 60 when unset). Keep it below heartbeat_timeout_seconds.
      lost_process_timeout_seconds=config_dict.placeholder(int)))
  return config


# ----------------------------------------------------------------------------- validation
# float32 is what the jitted step computes in: a config float beyond its range (e.g. lr=1e39)
# becomes inf on the device although it is finite in Python.
_F32_MAX = float(np.finfo(np.float32).max)
# AdamW moves every weight by about `lr` per step whatever the gradient scale, and DETR weights
# are O(0.01-1): an lr above 1 destroys the model in a step (DINO uses 1e-4, the synthetic
# default 1e-3). Rejecting it up front costs nothing; a smaller but still too large lr is caught
# by the trainer's non-finite loss check.
MAX_LR = 1.0


def _leaves(tree, prefix=""):
  """(dotted field, value) of every leaf of a ConfigDict / dict; tuples and lists are leaves."""
  items = tree.items() if hasattr(tree, "items") else ()
  for key, value in items:
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      yield from _leaves(value, name + ".")
    else:
      yield name, value


def _floats(value):
  if isinstance(value, bool):
    return []
  if isinstance(value, (float, np.floating)):
    return [float(value)]
  if isinstance(value, (list, tuple)):
    return [f for v in value for f in _floats(v)]
  return []


def check_finite_config(config):
  """Every float field is finite in float32, and 0 < optimizer.lr <= MAX_LR.

  Raises:
    ValueError: naming the first bad field (config.x.y=value) and the reason.
  """
  for name, value in _leaves(config):
    for f in _floats(value):
      if not (math.isfinite(f) and abs(f) <= _F32_MAX):
        raise ValueError(f"config.{name}={value!r} is not a finite float32 number (|x| <= "
                         f"{_F32_MAX:.3g}); the device would compute with inf/nan")
  opt = config.get("optimizer") if hasattr(config, "get") else None
  if opt is not None and opt.get("lr") is not None:
    lr = opt["lr"]
    if not 0 < lr <= MAX_LR:
      raise ValueError(f"config.optimizer.lr={lr!r} must be in (0, {MAX_LR:g}]: AdamW moves each "
                       "weight by about lr per step, so a larger lr destroys the model at once")


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    if not (hasattr(node, "keys") and part in node):
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def _is_int(v):
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


# (field, minimum) of integer fields, checked where the config has them.
_INT_FIELDS = (
    ("seed", 0), ("total_steps", 0), ("log_every", 1), ("checkpoint_every", 0),
    ("keep_checkpoints", 1), ("eval_every", 0), ("num_devices", 0),
    ("data.batch_size", 1), ("data.eval_batch_size", 1), ("data.unlabeled_batch_size", 1),
    ("data.max_boxes", 1), ("data.synthetic_num_images", 1), ("data.synthetic_seed", 0),
    ("data.synthetic_num_val", 0), ("data.synthetic_num_unlabeled", 0),
    ("data.pad_multiple", 1), ("data.num_threads", 0), ("data.prefetch", 0),
    ("data.max_size", 1), ("data.eval_size", 1), ("data.eval_max_size", 1),
    ("optimizer.warmup_steps", 0), ("data.size", 1), ("data.scale_step", 1),
    ("model.num_classes", 1), ("model.dn_labelbook_size", 1),
)
# Float fields that must be >= 0.
_NONNEGATIVE = ("optimizer.weight_decay", "optimizer.clip_norm", "optimizer.lr_drop_factor")


def validate_config(config):
  """Checks a trainer config before anything is built or compiled; one clear error per field.

  Checks `check_finite_config`, non-negative / positive integer fields (batch sizes, steps,
  seeds...), `data.buckets` (None or (h, w) pairs of positive integers), `data.scales`
  (positive integers), `ema_momentum` in [0, 1] and `model.dn_labelbook_size >=
  model.num_classes`. Fields a config does not have, or has as None (derived by `finalize`),
  are skipped.

  Raises:
    ValueError: "config.<field>=<value> ..." naming the field, the value and what is allowed.
  """
  check_finite_config(config)
  for field, minimum in _INT_FIELDS:
    value = _get(config, field)
    if value is _MISSING or value is None:
      continue
    if not _is_int(value) or value < minimum:
      raise ValueError(f"config.{field}={value!r} must be an integer >= {minimum}")
  for field in _NONNEGATIVE:
    value = _get(config, field)
    if value is not _MISSING and value is not None and not value >= 0:
      raise ValueError(f"config.{field}={value!r} must be >= 0")
  momentum = _get(config, "ema_momentum")
  if momentum is not _MISSING and momentum is not None and not 0 <= momentum <= 1:
    raise ValueError(f"config.ema_momentum={momentum!r} must be in [0, 1] (or None: no EMA): "
                     "the EMA params are momentum x EMA + (1 - momentum) x params")
  buckets = _get(config, "data.buckets")
  if buckets is not _MISSING and buckets:
    ok = isinstance(buckets, (list, tuple)) and all(
        isinstance(b, (list, tuple)) and len(b) == 2 and all(_is_int(v) and v > 0 for v in b)
        for b in buckets)
    if not ok:
      raise ValueError(f"config.data.buckets={buckets!r} must be None or a list of (height, "
                       "width) pairs of positive integers, e.g. ((192, 192),)")
  scales = _get(config, "data.scales")
  if scales is not _MISSING and scales is not None:
    if (not isinstance(scales, (list, tuple)) or not scales
        or not all(_is_int(v) and v > 0 for v in scales)):
      raise ValueError(f"config.data.scales={scales!r} must be a non-empty list of positive "
                       "integers (shorter-side sizes in pixels)")
  check_labelbook(config)
  return config


def check_labelbook(config):
  """`model.dn_labelbook_size >= model.num_classes` where both are set.

  The denoising queries embed ground-truth labels 0..num_classes-1 through a table of
  dn_labelbook_size rows: a smaller table is indexed out of range, which JAX clamps or turns
  into NaN a few steps later, so it is an error up front.
  """
  classes, book = _get(config, "model.num_classes"), _get(config, "model.dn_labelbook_size")
  if _MISSING in (classes, book) or None in (classes, book):
    return
  if book < classes:
    raise ValueError(
        f"config.model.dn_labelbook_size={book} is smaller than config.model.num_classes="
        f"{classes}: denoising embeds labels 0..{classes - 1}; set dn_labelbook_size >= "
        "num_classes (unset: it follows num_classes)")


# ----------------------------------------------------------------------------- finalisation
# (absolute field, fraction field, kind) of the schedule: the absolute step count when set,
# else round(fraction x total_steps).
SCHEDULE_FIELDS = (
    ("optimizer.lr_drop_steps", "optimizer.lr_drop_fractions", "steps"),
    ("optimizer.warmup_steps", "optimizer.warmup_fraction", "step"),
    ("semi.switch_step", "semi.switch_fraction", "step"),
)
# Folder names that say nothing about the dataset (the run name looks one folder higher).
_GENERIC_FOLDERS = ("annotations", "annotation", "anns", "ann", "labels", "label", "json")


def _set(config, dotted, value):
  *parents, last = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[last] = value


def dataset_name(data):
  """A short name for the configured training data (for run names and plot titles).

  COCO: the training json's folder (one higher for generic folders such as `annotations/`),
  else its file stem; TFDS: the dataset name; synthetic: "synthetic".
  """
  source = data.get("source", "synthetic")
  if source == "tfds":
    return str(data.get("tfds_name", "tfds")).split("/")[0]
  if source != "coco" or not data.get("train_ann"):
    return source
  path = os.path.abspath(data["train_ann"])
  folders = os.path.dirname(path).split(os.sep)
  for folder in reversed(folders[-2:]):
    if folder and folder.lower() not in _GENERIC_FOLDERS:
      return folder
  return os.path.splitext(os.path.basename(path))[0]


def _resolve_schedule(config):
  """Absolute schedule steps from their fractions of `total_steps` (SCHEDULE_FIELDS)."""
  total = config.get("total_steps")
  for absolute, fraction, kind in SCHEDULE_FIELDS:
    steps, frac = _get(config, absolute), _get(config, fraction)
    if steps is _MISSING:
      continue
    frac = None if frac is _MISSING else frac
    from_frac = None
    if frac is not None:
      fracs = tuple(frac) if kind == "steps" else (frac,)
      if not all(_is_fraction(f) for f in fracs):
        raise ValueError(f"config.{fraction}={frac!r} must be in [0, 1] (fraction(s) of "
                         "config.total_steps)")
      from_frac = tuple(int(round(f * total)) for f in fracs)
      from_frac = from_frac if kind == "steps" else from_frac[0]
    if steps is None:
      steps = from_frac if from_frac is not None else (() if kind == "steps" else 0)
      _set(config, absolute, steps)
    elif from_frac is not None and not _same_steps(steps, from_frac):
      _set(config, fraction, None)  # the absolute value replaces it; config.json says which
    values = tuple(steps) if kind == "steps" else (steps,)
    if any(v > total for v in values):
      raise ValueError(
          f"config.{absolute}={steps!r} is beyond config.total_steps={total} (the run ends "
          f"first); use config.{fraction} (scales with total_steps) or a smaller value")


def _is_fraction(f):
  return isinstance(f, (int, float, np.integer, np.floating)) and not isinstance(
      f, bool) and 0 <= f <= 1


def _same_steps(a, b):
  return (tuple(a) == tuple(b)) if isinstance(a, (list, tuple)) else a == b


def _resolve_classes(config):
  """model.num_classes from the training data's categories when None; dn_labelbook_size from
  num_classes when None."""
  model = config.get("model")
  if model is None or "num_classes" not in model:
    return
  check_labelbook(config)  # both set: fail before reading any data
  if model.num_classes is None:
    from sized_detr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    data = config.get("data") or {}
    if data.get("source") == "coco" and not data.get("train_ann"):
      raise ValueError("config.model.num_classes is unset and config.data.train_ann is empty: "
                       "set the training json (its categories give the classes) or num_classes")
    train = pipeline.get_source(config.data, "train")
    model.num_classes = len(train.category_ids)
  if "dn_labelbook_size" in model and model.dn_labelbook_size is None:
    model.dn_labelbook_size = model.num_classes
  check_labelbook(config)


def _resolve_unlabeled(config):
  """`data.labeled_percent` > 0: train_ann becomes its labeled split and the rest the unlabeled
  data (COCO-partial's split, fold `data.split_fold`, jsons under `data.split_dir`); then a
  Semi-DETR run on COCO files must have unlabeled data (a json, or a folder of images)."""
  data = config.get("data")
  if data is None or "labeled_percent" not in data:
    return
  percent = data.labeled_percent
  if percent:
    if data.source != "coco" or not data.train_ann:
      raise ValueError(f"config.data.labeled_percent={percent} splits config.data.train_ann, "
                       f"which needs config.data.source='coco' and a train_ann (source is "
                       f"{data.source!r}, train_ann {data.train_ann!r})")
    if data.unlabeled_ann or data.unlabeled_images:
      raise ValueError(f"config.data.labeled_percent={percent} takes the unlabeled images from "
                       "config.data.train_ann; config.data.unlabeled_ann / unlabeled_images "
                       "must then be empty (got "
                       f"{data.unlabeled_ann!r}, {data.unlabeled_images!r})")
    from sized_detr_jax.data import coco_partial  # pylint: disable=g-import-not-at-top
    try:
      labeled, unlabeled = coco_partial.cached_split(data.train_ann, percent, data.split_fold,
                                                     data.split_dir)
    except coco_partial.SplitError as e:
      raise ValueError(f"config.data.labeled_percent={percent}: {e}") from None
    data.update(train_ann=labeled, unlabeled_ann=unlabeled, unlabeled_images=data.train_images,
                labeled_percent=0.0)
  if (config.get("method") == "semi_detr" and data.source == "coco"
      and not (data.unlabeled_ann or data.unlabeled_images)):
    raise ValueError("Semi-DETR needs unlabeled images: set config.data.unlabeled_images (a "
                     "folder; with config.data.unlabeled_ann, a COCO json of them) or "
                     "config.data.labeled_percent (a split of config.data.train_ann)")


def finalize(config):
  """The config with every derived field resolved: call it once, before anything is built.

  A new ConfigDict (the argument is not modified); finalising a finalised config changes
  nothing. In order:
    * `validate_config` on the fields as given (None fields are skipped);
    * schedule: `optimizer.lr_drop_steps`, `optimizer.warmup_steps`, `semi.switch_step` left
      None become round(fraction x total_steps) of `lr_drop_fractions`, `warmup_fraction`,
      `switch_fraction`; an absolute value, when set, replaces its fraction (set to None), and
      one beyond `total_steps` is an error naming the field;
    * data sizes: the size fields left None follow `data.size` (`pipeline.resolve_sizes`);
      explicit ones that contradict each other fail (`pipeline.check_sizes`);
    * `name`: "{dataset}" in it becomes `dataset_name(config.data)`;
    * unlabeled data: `data.labeled_percent` > 0 splits `data.train_ann` (COCO-partial) into
      the labeled train_ann and the unlabeled_ann; Semi-DETR on COCO files without unlabeled
      data is an error;
    * classes: `model.num_classes` None -> the training data's category count (reads the
      training json), `model.dn_labelbook_size` None -> num_classes; both set: checked
      (dn_labelbook_size >= num_classes) before any data is read;
    * `validate_config` on the result;
    * `finalized` = True, which the library functions that take a config check
      (`require_finalized`).

  Raises:
    ValueError: one line naming the field(s), the value(s) and the fix.
  """
  validate_config(config)
  config = copy.deepcopy(config)
  if config.get("total_steps") is not None:
    _resolve_schedule(config)
  check_labelbook(config)
  if config.get("data") is not None:
    from sized_detr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    resolved = pipeline.resolve_data_config(config.data)
    pipeline.check_sizes(resolved)
    for key in pipeline.SIZE_FIELDS:
      if key in config.data:
        config.data[key] = resolved[key]
  name = config.get("name")  # named after the json given, before a split replaces it
  if isinstance(name, str) and "{dataset}" in name:
    config.name = name.replace("{dataset}", dataset_name(config.get("data") or {}))
  _resolve_unlabeled(config)
  _resolve_classes(config)
  validate_config(config)
  with config.unlocked():
    config.finalized = True
  return config


def require_finalized(config, caller: str) -> None:
  """Raises unless `config` came from `finalize` (the entry points call it once: the CLI, the
  study, the benchmarks, `Detector`); library functions take resolved configs."""
  if not config.get("finalized", False):
    raise ValueError(f"{caller}: the config is not finalised; pass config_lib.finalize(config) "
                     "(it resolves the schedule, image sizes, classes and name)")
