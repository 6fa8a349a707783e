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


def load_config(path, arg=None):
  """`get_config(arg)` of the config file at `path`."""
  return load_config_module(path).get_config(arg)
