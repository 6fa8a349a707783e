"""A run's files through etils.epath (sized_detr_jax/fs.py): metrics, TensorBoard events,
evaluation files, plots, the workdir lock, config.json and checkpoint folders on a filesystem
that is not the local one (a fake gs:// backed by fsspec's in-memory filesystem, registered
here), and no bare open()/os.path on those paths in the modules that write them."""
import inspect
import json
import os
import re

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
import pytest
import tb_events

from sized_detr_jax import checkpointing
from sized_detr_jax import evaluate
from sized_detr_jax import fs
from sized_detr_jax import inference_spec
from sized_detr_jax import metrics_log
from sized_detr_jax import predict
from sized_detr_jax import state as state_lib
from sized_detr_jax import train
from sized_detr_jax import workdir_lock


class _FakeGCS(MemoryFileSystem):
  """gs:// held in memory (a store of its own, emptied per test)."""
  protocol = ("gs", "gcs")
  store = {}
  pseudo_dirs = [""]


@pytest.fixture
def gs(monkeypatch):
  """Route epath's gs:// to the in-memory filesystem; returns a fresh run folder URI."""
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # epath's fsspec backend
  for name in _FakeGCS.protocol:  # epath asks fsspec for "gcs"
    fsspec.register_implementation(name, _FakeGCS, clobber=True)
  _FakeGCS.store.clear()
  _FakeGCS.pseudo_dirs[:] = [""]
  return "gs://bucket/runs/x"


def _key(key):
  """A store key without the scheme and leading slashes: "bucket/runs/x/file"."""
  return key.split("://")[-1].lstrip("/")


def _stored(uri):
  """The bytes the fake store holds for `uri` (read from the store, not through epath)."""
  found = [v for k, v in _FakeGCS.store.items() if _key(k) == _key(uri)]
  assert len(found) == 1, (uri, sorted(_FakeGCS.store))
  return bytes(found[0].getbuffer())


def test_paths_are_uris_or_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(fs.path("run")) == str(tmp_path / "run")
  assert str(fs.path("gs://b/run/x")) == "gs://b/run/x" and not fs.is_local("gs://b/x")


@pytest.mark.parametrize("where", ["local", "gs"])
def test_atomic_write_replaces_and_append_appends(where, gs, tmp_path):
  folder = str(tmp_path) if where == "local" else gs
  fs.path(folder).mkdir(parents=True, exist_ok=True)
  for text in ("old", "new"):
    fs.write_text_atomic(f"{folder}/a.json", text)
    fs.append_text(f"{folder}/b.txt", text + "\n")
  assert fs.path(f"{folder}/a.json").read_text() == "new"
  assert fs.path(f"{folder}/b.txt").read_text() == "old\nnew\n"
  assert sorted(p.name for p in fs.path(folder).iterdir()) == ["a.json", "b.txt"]  # no tmp left


def test_metrics_and_tensorboard_on_gs(gs, tmp_path):
  log = metrics_log.MetricsLog(gs, total_steps=4, hparams={"lr": 0.1})
  log.write(2, {"loss": 3.0})
  log.write(4, {"loss": 2.0})
  log.write_eval(4, {"AP": 0.5})
  log.close()
  rows = [json.loads(line) for line in _stored(f"{gs}/metrics.jsonl").decode().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(2, 3.0), (4, 2.0)]
  # A restart appends its event to the object (rewritten: object stores cannot append).
  metrics_log.MetricsLog(gs, total_steps=4, start_step=2, tensorboard=False)
  assert [r.get("step") for r in metrics_log.read_metrics(f"{gs}/metrics.jsonl")] == [2]
  events = [_key(k) for k in _FakeGCS.store if "/tensorboard/events.out.tfevents" in k]
  assert len(events) == 1
  local = tmp_path / "tb"
  local.mkdir()
  (local / events[0].rsplit("/", 1)[1]).write_bytes(_stored(events[0]))
  scalars, hparams = tb_events.read_events(str(local))
  assert scalars["train/loss"] == [(2, 3.0), (4, 2.0)] and scalars["eval/AP"] == [(4, 0.5)]
  assert hparams == {"lr": pytest.approx(0.1)}


def test_evaluation_files_plot_and_coco_json_on_gs(gs):
  record = evaluate.write_evaluation(gs, 3, [{"image_id": 1}], {"AP": 0.25})
  assert json.loads(_stored(f"{gs}/eval_metrics.json")) == record == {"step": 3, "AP": 0.25}
  evaluate.write_evaluation(gs, 5, [], {"AP": 0.5})
  lines = _stored(f"{gs}/eval_metrics.jsonl").decode().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [3, 5]
  assert json.loads(_stored(f"{gs}/detections_3.json")) == [{"image_id": 1}]
  assert train._evaluated_at(gs, 5) and not train._evaluated_at(gs, 3)  # pylint: disable=protected-access
  evaluate.plot_per_size({"AP": 0.2, "APs": 0.1, "APm": 0.2, "APl": 0.3}, f"{gs}/per_size_5.png")
  assert _stored(f"{gs}/per_size_5.png")[:8] == b"\x89PNG\r\n\x1a\n"
  gt = {"images": [{"id": 1, "width": 10, "height": 10}], "annotations": [],
        "categories": [{"id": 1, "name": "a"}]}
  fs.path(f"{gs}/gt.json").write_text(json.dumps(gt))
  assert evaluate.pycocotools_coco(f"{gs}/gt.json").getImgIds() == [1]


def test_lock_config_changes_and_step_folders_on_gs(gs):
  with workdir_lock.WorkdirLock(gs) as lock:
    assert json.loads(_stored(str(lock.path)))["pid"] > 0
    with pytest.raises(workdir_lock.WorkdirLockedError, match="in use by another training job"):
      workdir_lock.WorkdirLock(gs).acquire()
  assert not fs.path(f"{gs}/{workdir_lock.LOCK_NAME}").exists()
  fs.path(f"{gs}/config.json").write_text(json.dumps({"seed": 0, "model": {"d": 64}}))
  assert checkpointing.config_changes(f"{gs}/config.json", {"seed": 1, "model": {"d": 64}}) == [
      "seed: 0 -> 1"]
  for step in (3, 10):
    (fs.path(f"{gs}/checkpoints/{step}/state") / "x").write_text("")
  (fs.path(f"{gs}/checkpoints/12.orbax-checkpoint-tmp") / "x").write_text("")
  assert state_lib.newest_step_dir(gs) == f"{gs}/checkpoints/10"


_LOCAL_FILE_CALLS = re.compile(
    r"(?<![\w.])(?<!def )open\(|\bos\.path\.|"
    r"\bos\.(makedirs|listdir|rename|replace|remove|stat)\(|\bshutil\.")


@pytest.mark.parametrize("source", [
    inspect.getsource(train), inspect.getsource(checkpointing), inspect.getsource(metrics_log),
    inspect.getsource(workdir_lock),
    *[inspect.getsource(f) for f in (evaluate.pycocotools_coco, evaluate.write_evaluation,
                                     evaluate.plot_per_size, evaluate.run_evaluation,
                                     evaluate.restore_for_inference,
                                     state_lib.newest_step_dir, state_lib.load_init_from,
                                     inference_spec.write, inference_spec.read,
                                     predict.image_ids_from_ann)]],
    ids=["train", "checkpointing", "metrics_log", "workdir_lock", "pycocotools_coco",
         "write_evaluation", "plot_per_size", "run_evaluation", "restore_for_inference",
         "newest_step_dir", "load_init_from", "inference_spec.write", "inference_spec.read",
         "predict.image_ids_from_ann"])
def test_no_bare_open_or_os_path_on_run_files(source):
  """Run files go through fs/epath; /proc (always local) is the one marked exception."""
  bad = [line.strip() for line in source.splitlines()
         if _LOCAL_FILE_CALLS.search(line.split("#")[0]) and "/proc" not in line]
  assert not bad, bad


def test_predict_reads_the_image_json_on_gs(gs):
  ann = f"{gs}/val.json"
  fs.write_text_atomic(ann, json.dumps({"images": [{"id": 7, "file_name": "sub/a.png"},
                                                   {"id": 9, "file_name": "b.png"}]}))
  assert predict.image_ids_from_ann(ann, ["x/a.png", "b.png", "c.png"]) == [7, 9, None]


@pytest.mark.slow
def test_predict_writes_detections_and_drawings_to_gs(gs, trained_smoke_run):
  images = os.path.join(trained_smoke_run["data"], "images", "val")
  out = f"{gs}/pred"
  result = predict.predict_to_files(trained_smoke_run["workdir"], images, out=out)
  stored = json.loads(_stored(f"{out}/detections.json"))
  assert len(stored) == result["detections"] > 0
  assert {d["file_name"] for d in stored} <= set(os.listdir(images))
  assert result["written"] and all(_stored(p)[:8] == b"\x89PNG\r\n\x1a\n"
                                   for p in result["written"][:3])
