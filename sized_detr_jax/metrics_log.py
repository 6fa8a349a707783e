"""Training logs: `metrics.jsonl` (append-only), TensorBoard scalars, and a progress line.

Only process 0 writes. `metrics.jsonl` gets one JSON object per logged step (`step`, `loss`,
every loss term, `lr`, throughput); a resumed run appends to it and never truncates it. Each
(re)start of a run on an existing file first appends an event record,
`{"event": "resume", "from_step": N}` (continuing from checkpoint step N: earlier records past
step N were superseded) or `{"event": "restart", "from_step": 0}` (a fresh start: every earlier
record was superseded). `read_metrics` applies them.
"""
import io
import json
import math
import time

from absl import logging
import jax

from sized_detr_jax import fs


# The evaluation's scalars in TensorBoard (evaluate.METRIC_NAMES' precision figures), under
# "eval/"; they are also the hparams plugin's metrics.
EVAL_SCALARS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def flat_hparams(config, prefix=""):
  """{"data.batch_size": 4, ...}: a config's leaves as TensorBoard hparams (bool, int, float or
  str; tuples and None as their text)."""
  out = {}
  for key, value in (config.items() if hasattr(config, "items") else ()):
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      out.update(flat_hparams(value, name + "."))
    elif isinstance(value, (bool, int, float, str)):
      out[name] = value
    else:
      out[name] = str(value)
  return out


class MetricsLog:
  """Append-only metrics file + TensorBoard + progress lines (process 0 only).

  TensorBoard (WORKDIR/tensorboard, when tensorboardX is installed): every logged training value
  as `train/<key>` (loss terms, `lr`, `img_per_s`...), the learning rate of each parameter group
  as `lr/<group>` (`lr_multipliers`), each evaluation as `eval/<metric>` and
  `eval/box_loss_share_<size>`, and the config as hparams (`hparams`) with the eval metrics as
  the hparams plugin's metrics.
  """

  def __init__(self, workdir, *, total_steps, start_step=0, tensorboard=True, hparams=None,
               lr_multipliers=None):
    self.enabled = jax.process_index() == 0
    self.total_steps = int(total_steps)
    self.path = fs.path(workdir) / "metrics.jsonl"
    self._tb = None
    self._last_time = None
    self._last_step = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._mark_start(int(start_step))
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
          logdir = fs.path(workdir) / "tensorboard"
          _route_tensorboard_through_epath(logdir)
          self._tb = SummaryWriter(str(logdir))
        except ImportError:
          logging.info("tensorboardX is not installed: no TensorBoard scalars.")
    self._lr_multipliers = dict(lr_multipliers or {})
    if self._tb is not None and hparams:
      self._write_hparams(hparams)

  def _write_hparams(self, hparams):
    """The config as a hparams-plugin session of this run (its metrics: the eval scalars)."""
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    experiment, start, end = summary.hparams(
        hparams, {f"eval/{k}": float("nan") for k in EVAL_SCALARS})
    writer = self._tb._get_file_writer()  # pylint: disable=protected-access
    for proto in (experiment, start, end):
      writer.add_summary(proto)
    self._tb.flush()

  def _mark_start(self, start_step):
    """Appends a resume/restart event when the file already holds records."""
    if not self.path.exists() or self.path.stat().length == 0:
      return
    event = "resume" if start_step > 0 else "restart"
    if event == "restart":
      logging.warning("%s already holds records of an earlier run that restarted from step 0; "
                      "they are kept and marked superseded (read_metrics drops them).", self.path)
    fs.append_text(self.path, json.dumps({"event": event, "from_step": start_step,
                                          "time": time.time()}) + "\n")

  def write(self, step, scalars, *, images_per_step=None, prefix="train"):
    """Log `scalars` (dict of floats) at `step`; returns the record written."""
    now = time.perf_counter()
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    if images_per_step and self._last_time is not None and step > self._last_step:
      steps = step - self._last_step
      record["img_per_s"] = images_per_step * steps / max(now - self._last_time, 1e-9)
      record["eta_s"] = (self.total_steps - step) * (now - self._last_time) / steps
    self._last_time, self._last_step = now, step
    if not self.enabled:
      return record
    fs.append_text(self.path, json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and math.isfinite(v):
          self._tb.add_scalar(f"{prefix}/{k}", v, step)
      if "lr" in record:
        for group, mult in self._lr_multipliers.items():
          self._tb.add_scalar(f"lr/{group}", record["lr"] * mult, step)
      self._tb.flush()
    logging.info("%s", format_progress(record, self.total_steps))
    return record

  def write_eval(self, step, metrics, *, loss_share=None):
    """TensorBoard scalars of an evaluation at `step`: `eval/<AP...>` (0-1; COCO's -1 for "no
    ground truth of that size" is left out) and `eval/box_loss_share_<size>` (the share of the
    final layer's box loss per size class, `evaluate.box_loss_share`)."""
    if self._tb is None or metrics is None:
      return
    for key in EVAL_SCALARS:
      if key in metrics and metrics[key] >= 0:
        self._tb.add_scalar(f"eval/{key}", float(metrics[key]), step)
    for size, share in (loss_share or {}).items():
      self._tb.add_scalar(f"eval/box_loss_share_{size}", float(share), step)
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


class _EpathEventFile:
  """A TensorBoard event file on a non-local filesystem, written through epath: the events are
  kept in memory and the whole object rewritten on flush (object stores cannot append)."""

  def __init__(self, target):
    self._path = fs.path(target)
    self._buffer = io.BytesIO()

  def write(self, data):
    self._buffer.write(data)

  def flush(self):
    self._path.write_bytes(self._buffer.getvalue())

  def close(self):
    self.flush()


class _EpathEventFiles:
  """tensorboardX writer factory (`record_writer.register_writer_factory`) over epath."""

  def open(self, target):
    return _EpathEventFile(target)

  def directory_check(self, target):
    fs.path(target).mkdir(parents=True, exist_ok=True)


def _route_tensorboard_through_epath(logdir):
  """Event files under a `scheme://` logdir go through epath, as the rest of the workdir."""
  if fs.is_local(logdir):
    return
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  record_writer.register_writer_factory(str(logdir).split("://", 1)[0], _EpathEventFiles())


def format_progress(record, total_steps):
  """One line: step/total, loss, the main loss terms, lr, img/s and ETA."""
  parts = [f"step {record['step']}/{total_steps}", f"loss {record.get('loss', float('nan')):.4f}"]
  for key in ("loss_ce", "loss_bbox", "loss_giou"):
    if key in record:
      parts.append(f"{key[5:]} {record[key]:.4f}")
  if "lr" in record:
    parts.append(f"lr {record['lr']:.2e}")
  if "img_per_s" in record:
    parts.append(f"{record['img_per_s']:.1f} img/s")
    eta = int(record["eta_s"])
    parts.append(f"ETA {eta // 3600:d}:{eta % 3600 // 60:02d}:{eta % 60:02d}")
  return " | ".join(parts)


def read_metrics(path):
  """The records of `metrics.jsonl` that describe the current run, in order.

  Applies the resume/restart events (module docstring): a record logged before an event with
  `from_step` N and a step > N was superseded by the retraining of that step and is dropped.
  Unparsable lines (a write cut by a kill) are skipped.

  Returns:
    list of record dicts (each with "step"), without the event records.
  """
  records = []
  with fs.path(path).open() as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if "event" in record:
        records = [r for r in records if r["step"] <= record.get("from_step", 0)]
      elif "step" in record:
        records.append(record)
  return records
