r"""The command line (`sized-detr`, `python run.py`): train, evaluate, predict with or summarise
a detector from an ml_collections config.

  sized-detr --config=dino_r50:tiny --workdir=runs/tiny [--mode=train]
  sized-detr --config=dino_r50 --mode=summary
  sized-detr --config=my_config.py:arg --config.criterion.bbox_loss=sized_l1
  sized-detr --list-configs          # every packaged config and what its tokens mean

`--config` is a packaged config's name (`NAME[:TOKENS]`, see --list-configs) or a config file
path (`FILE.py[:ARG]`); with none it is `synthetic` (the embedded synthetic dataset).
This module only parses flags and dispatches to the library.
"""
import logging as pylogging
import os
import sys

# XLA's CPU scheduler ordered for memory, and glibc malloc keeping freed blocks (each step's
# temporaries are not page-faulted in again): see sized_detr_jax/host_runtime.py. Set before
# the XLA backend starts; a value the user gives wins.
from sized_detr_jax import host_runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
host_runtime.configure()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from sized_detr_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from sized_detr_jax import configs  # pylint: disable=g-import-not-at-top,wrong-import-position

_DEFAULT_CONFIG = "synthetic"
_MODES = ("train", "eval", "predict", "summary")
_PROG = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "sized-detr"

config_flags.DEFINE_config_file("config", None, "Packaged config name or config file, "
                                "optionally with ':arg' (get_config(arg)); default synthetic. "
                                "--list-configs lists the names and tokens.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, detections). "
                    "Default: a fresh folder under ./runs/ named after the config.")
flags.DEFINE_enum("mode", "train", _MODES, "What to do.")
flags.DEFINE_string(
    "compilation_cache", os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "sized_detr_jax", "xla"),
    "JAX persistent compilation cache folder ('' turns it off; $JAX_COMPILATION_CACHE_DIR, "
    "when set, wins). Re-runs load the compiled init, evaluation and prediction functions, and "
    "the train step: with the cache on, a one-process run splits the step at the host "
    "Hungarian matching into two executables (config.split_step, default None: split where "
    "cached), kept with the init under FOLDER/sized_detr_jax_executables, keyed by the config "
    "and the code, so a re-run loads them without tracing. With the cache off, or "
    "--config.split_step=False, the step calls back into Python and compiles every run.")
flags.DEFINE_string("images", None, "--mode=predict: an image folder, glob or file to run the "
                    "trained detector of --workdir on (only its config.json, inference.json and "
                    "checkpoints are read; --config is not used).")
flags.DEFINE_multi_string("image", [], "--mode=predict: image file(s); repeatable; an alias of "
                          "--images, both may be given.")
flags.DEFINE_string("out", None, "--mode=predict: output folder for detections.json and the "
                    "drawn PNGs (default WORKDIR/predictions).")
flags.DEFINE_string("images_ann", None, "--mode=predict: a COCO json listing the images: "
                    "detections.json reuses its image ids (matched by file name).")
flags.DEFINE_float("min_score", 0.3, "--mode=predict: draw detections scoring at least this.")
flags.DEFINE_list("categories", None, "--mode=predict on a run without inference.json (older "
                  "runs): the class names in label order.")
flags.DEFINE_bool("fresh_start", False, "--mode=train: when the workdir's checkpoints do not fit "
                  "the config (another model), move them aside (<step>.superseded-<time>) and "
                  "train from step 0 instead of stopping with an error.")
FLAGS = flags.FLAGS


def _run_mode(mode, config, workdir):
  """Dispatch to the library function that implements `mode`."""
  if mode == "summary":
    from sized_detr_jax import summary  # pylint: disable=g-import-not-at-top
    return summary.summarize(config)
  if mode == "predict":
    from sized_detr_jax import predict  # pylint: disable=g-import-not-at-top
    if not workdir or not (FLAGS.images or FLAGS.image):
      raise ValueError("--mode=predict needs --workdir (a training run) and --images=DIR|GLOB|"
                       "FILE (or --image=FILE ...)")
    return predict.predict_to_files(workdir, ([FLAGS.images] if FLAGS.images else [])
                                    + list(FLAGS.image), out=FLAGS.out,
                                    images_ann=FLAGS.images_ann, min_score=FLAGS.min_score,
                                    categories=FLAGS.categories)
  from sized_detr_jax import evaluate  # pylint: disable=g-import-not-at-top
  from sized_detr_jax import train  # pylint: disable=g-import-not-at-top
  if mode == "eval":
    return evaluate.evaluate_only(config, workdir)
  try:
    return train.train_and_evaluate(config, workdir,
                                    on_mismatch="fresh" if FLAGS.fresh_start else "error")
  except train.Preempted as e:
    print(f"{_PROG}: {e}", file=sys.stderr)
    sys.exit(143)  # 128 + SIGTERM, as a process killed by it


class _QuietLibraries(pylogging.Filter):
  """Drop INFO chatter of orbax/grain/jax (kept: their warnings and our progress lines)."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or not any(
        f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "grain", "jax"))


def _unknown_override(argv):
  """(override, valid keys at its deepest existing level) of the first bad --config.x, or None."""
  spec = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
  path, _, arg = spec.partition(":")
  config = config_lib.load_config(path, arg or None)
  for a in argv:
    if not a.startswith("--config."):
      continue
    override = a[len("--config."):].split("=", 1)[0]
    node = config
    for part in override.split("."):
      if not (hasattr(node, "keys") and part in node):
        return override, sorted(node.keys()) if hasattr(node, "keys") else []
      node = node[part]
  return None


def _fail(message):
  """Exit with one line on stderr (status 1), or re-raise with SIZED_DETR_TRACEBACK=1."""
  if os.environ.get("SIZED_DETR_TRACEBACK"):
    raise  # pylint: disable=misplaced-bare-raise
  sys.exit(f"{_PROG}: {' '.join(str(message).split())}  (SIZED_DETR_TRACEBACK=1 shows the "
           "traceback)")


def _parse_flags(argv):
  """absl parsing with `synthetic` as the default config and config names resolved to their
  files. Bad flags give one line: an unknown --config.x override lists the valid keys; a bad
  value, mode, config file or config argument names the flag and the value."""
  if not any(a.startswith("--config=") for a in argv[1:]):
    argv = argv[:1] + [f"--config={_DEFAULT_CONFIG}"] + argv[1:]
  resolved = [f"--config={configs.resolve(a.split('=', 1)[1])}" if a.startswith("--config=")
              else a for a in argv]
  try:
    rest = FLAGS(resolved)
    FLAGS.config.keys()  # a config file that failed to load raises only when first read
    return rest
  except (KeyError, AttributeError):
    bad = _unknown_override(argv)
    if bad is None:
      _fail(f"cannot parse the flags {argv[1:]}")
    sys.exit(f"{_PROG}: unknown config field --config.{bad[0]}; valid keys at that level: "
             f"{', '.join(bad[1])}")
  except (flags.Error, ValueError, OSError, SyntaxError) as e:
    # A bad value (--config.total_steps=abc, --mode=bogus), or the config file failed to load;
    # absl wraps the latter in a message holding a traceback: say it again without.
    _fail(_config_file_error(argv) or e)


def _config_file_error(argv):
  """One-line reason the --config file or its ':arg' fails to load, or None if it loads."""
  spec = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
  path, _, arg = configs.resolve(spec).partition(":")
  if not os.path.isfile(path):
    return (f"--config={spec}: config file {path} not found (packaged configs: "
            f"{', '.join(configs.NAMES)})")
  try:
    config_lib.load_config(path, arg or None)
  except Exception as e:  # pylint: disable=broad-except
    return f"--config={spec}: {type(e).__name__}: {e}"
  return None


def _enable_compilation_cache(folder):
  """Points JAX's persistent compilation cache at `folder` unless the user set one."""
  if not folder or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", folder)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _enable_compilation_cache(FLAGS.compilation_cache)
  try:
    _check_workdir(FLAGS.workdir)
    # Derived fields (classes from the data, sizes, schedule, name) resolved and the config
    # validated before anything is built or compiled.
    config = config_lib.finalize(FLAGS.config)
    _run_mode(FLAGS.mode, config, FLAGS.workdir)
  except (ValueError, OSError, FloatingPointError) as e:
    # Bad input (config values, files, data), a full disk, a diverged run: one clear line.
    _fail(f"{type(e).__name__}: {e}")
  return 0


def _check_workdir(workdir):
  if workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise FileExistsError(f"--workdir={workdir} exists and is not a folder")


def entry() -> None:
  """The `sized-detr` console script and `python run.py`: --help and --list-configs print and
  exit 0; anything else runs `main` under absl."""
  if any(a in ("-h", "--help", "-?") for a in sys.argv[1:]):
    # absl exits with status 1 after --help; a help request is not an error.
    print(__doc__)
    print(FLAGS.module_help(sys.modules[__name__]))
    sys.exit(0)
  if any(a in ("--list-configs", "--list_configs") for a in sys.argv[1:]):
    print(configs.describe())
    sys.exit(0)
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  entry()
