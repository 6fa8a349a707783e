"""Loading `experiments/*.py` configs by path (as ml_collections' config_flags does)."""
import importlib.util
import os


def load_config_module(path):
  """Import a config file by path and return the module (which defines `get_config(arg)`)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file not found: {path}")
  name = "config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling_config(this_file, filename, arg=None):
  """`get_config(arg)` of another file in the same folder (configs building on each other)."""
  return load_config_module(os.path.join(os.path.dirname(os.path.abspath(this_file)),
                                         filename)).get_config(arg)


def parse_tokens(arg, known, source):
  """Comma-separated variant tokens of `get_config(arg)`; unknown ones raise one clear error.

  Args:
    arg: the config argument ("a,b" or None).
    known: the tokens the config file accepts.
    source: the config file name for the message (e.g. "experiments/synthetic.py").

  Returns:
    list of tokens in order.
  """
  tokens = [t for t in (arg or "").split(",") if t]
  unknown = [t for t in tokens if t not in known]
  if unknown:
    raise ValueError(f"{source}: unknown variant tokens {unknown}; known: {tuple(known)}")
  return tokens


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
  """`get_config(arg)` of the config file at `path`."""
  return load_config_module(path).get_config(arg)


def add_trainer_fields(config, *, name, total_steps, log_every=100, checkpoint_every=1000,
                       eval_every=0):
  """The fields `train.py` reads, with defaults, so every experiment has the same knobs.

  Fields: name, seed, total_steps, log_every, checkpoint_every (0: only at the end),
  keep_checkpoints, eval_every (0: only at the end), eval_at_end, num_devices (0: all),
  ema_momentum (None: no EMA params), eval_ema, log_grad_split (log the gradient norm of each
  loss kind and the share of clipped steps), distributed (jax.distributed.initialize args).
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
  config.distributed = ml_collections.ConfigDict(dict(
      enabled=False,
      coordinator_address=config_dict.placeholder(str),
      num_processes=config_dict.placeholder(int),
      process_id=config_dict.placeholder(int)))
  return config
