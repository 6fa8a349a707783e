"""Reading TensorBoard event files back (TensorFlow's reader, independent of the writer)."""
import glob
import os

import pytest


def read_events(logdir):
  """({tag: [(step, value)]} of the scalars, {hparam: value} of the last hparams session) of
  every event file under `logdir`, in file and write order."""
  tf = pytest.importorskip("tensorflow")
  from tensorboardX.proto import plugin_hparams_pb2  # pylint: disable=g-import-not-at-top
  scalars, hparams = {}, {}
  for path in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"),
                               recursive=True)):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "_hparams_/session_start_info":
          data = plugin_hparams_pb2.HParamsPluginData.FromString(
              value.metadata.plugin_data.content)
          hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                     for k, v in data.session_start_info.hparams.items()}
        elif value.HasField("simple_value"):
          scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars, hparams
