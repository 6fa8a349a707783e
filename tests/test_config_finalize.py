"""config_lib.finalize: derived sizes, schedule, classes and name; contradictions fail early.

No training here (no jax compile): configs are loaded, finalised and compared with values
written down before the derivations existed (tests/data/config_snapshot.json: every
experiments/ variant at commit 39c344a) and with DINO's / the paper's numbers.
"""
import copy
import json
import os

from PIL import Image
import pytest

from sized_detr_jax import config_lib
from sized_detr_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "tests", "data", "config_snapshot.json")) as _f:
  SNAPSHOT = json.load(_f)


def _load(spec):
  path, _, arg = spec.partition(":")
  return config_lib.load_config(os.path.join(ROOT, "experiments", path), arg or None)


def _plain(value):
  return json.loads(json.dumps(value))


# The snapshot's `rescale` variants are gone with the token (`sized_l1` is that form now).
@pytest.mark.parametrize("spec", sorted(s for s in SNAPSHOT["variants"] if "rescale" not in s))
def test_every_variant_resolves_to_its_values_before_the_knobs(spec):
  """Data section (every field, effective buckets), schedule and classes are unchanged."""
  before = SNAPSHOT["variants"][spec]
  config = config_lib.finalize(_load(spec))
  data = pipeline.resolve_data_config(config.data)
  expected = SNAPSHOT["data_sections"][before["data"]]
  for field, value in expected.items():
    if field == "effective_buckets":
      assert _plain(pipeline.buckets_from_config(data)) == value, spec
    else:
      assert _plain(data[field]) == value, (spec, field)
  assert _plain(list(config.data.buckets)) == expected["effective_buckets"], spec
  schedule = before["schedule"]
  assert config.total_steps == schedule["total_steps"]
  assert list(config.optimizer.lr_drop_steps) == schedule["lr_drop_steps"], spec
  assert config.optimizer.warmup_steps == schedule["warmup_steps"], spec
  assert (config.semi.switch_step if "semi" in config else None) == schedule["switch_step"]
  assert config.model.num_classes == before["model"]["num_classes"]
  assert config.model.dn_labelbook_size == before["model"]["dn_labelbook_size"]


def test_paper_rows_keep_their_absolute_iterations():
  """Hand-written from the papers / reference configs, independent of the snapshot."""
  dino = config_lib.finalize(_load("dino_r50.py:"))
  assert (dino.total_steps, tuple(dino.optimizer.lr_drop_steps)) == (12 * 7393, (11 * 7393,))
  assert tuple(dino.data.scales) == tuple(range(480, 801, 32))
  assert (dino.data.max_size, dino.data.eval_size, dino.data.eval_max_size) == (1333, 800, 1333)
  assert (tuple(dino.data.crop_scales), tuple(dino.data.crop_size)) == ((400, 500, 600),
                                                                        (384, 600))
  co = config_lib.finalize(_load("co_dino.py:"))
  assert (co.total_steps, tuple(co.optimizer.lr_drop_steps)) == (12 * 7393, (11 * 7393,))
  for spec, total, switch, drops in (
      ("semi_detr.py:p10", 120_000, 60_000, ()),
      ("semi_detr.py:p1,sized_sup", 120_000, 60_000, ()),
      ("semi_detr.py:full", 240_000, 120_000, (120_000, 160_000)),
      ("semi_detr.py:p10,iters300k", 300_000, 150_000, ()),
      ("semi_detr.py:p10,noswitch", 120_000, -1, ())):
    c = config_lib.finalize(_load(spec))
    assert (c.total_steps, c.semi.switch_step, tuple(c.optimizer.lr_drop_steps)) == (
        total, switch, drops), spec
  syn = config_lib.finalize(_load("synthetic.py:"))
  assert (syn.total_steps, tuple(syn.optimizer.lr_drop_steps), syn.optimizer.warmup_steps) == (
      4000, (3500,), 100)


@pytest.mark.parametrize("spec", ["synthetic.py:", "semi_detr.py:p10,noswitch",
                                  "co_dino.py:", "dino_r50.py:smoke"])
def test_finalize_is_idempotent_and_leaves_its_argument_alone(spec):
  config = _load(spec)
  given = copy.deepcopy(config).to_dict()
  once = config_lib.finalize(config)
  assert config.to_dict() == given
  assert config_lib.finalize(once).to_dict() == once.to_dict()


def test_total_steps_scales_the_schedule():
  config = _load("synthetic.py:")
  config.total_steps = 1000
  c = config_lib.finalize(config)
  assert (tuple(c.optimizer.lr_drop_steps), c.optimizer.warmup_steps) == ((875,), 25)
  semi = _load("semi_detr.py:full")
  semi.total_steps = 3000
  c = config_lib.finalize(semi)
  assert (c.semi.switch_step, tuple(c.optimizer.lr_drop_steps)) == (1500, (1500, 2000))
  dino = _load("dino_r50.py:")
  dino.total_steps = 1200
  assert tuple(config_lib.finalize(dino).optimizer.lr_drop_steps) == (1100,)


def test_absolute_schedule_values_replace_fractions_and_must_fit_the_run():
  config = _load("synthetic.py:")
  config.optimizer.lr_drop_steps = (1000,)
  c = config_lib.finalize(config)
  # The absolute value wins; the fraction is cleared so config.json says which was used.
  assert tuple(c.optimizer.lr_drop_steps) == (1000,) and c.optimizer.lr_drop_fractions is None
  config.total_steps = 900
  with pytest.raises(ValueError, match=r"^config\.optimizer\.lr_drop_steps=\(1000,\) is beyond "
                                       r"config\.total_steps=900"):
    config_lib.finalize(config)
  semi = _load("semi_detr.py:p10")
  semi.semi.switch_step = 200_000
  with pytest.raises(ValueError, match=r"config\.semi\.switch_step=200000 is beyond "
                                       r"config\.total_steps=120000"):
    config_lib.finalize(semi)
  bad = _load("synthetic.py:")
  bad.optimizer.warmup_fraction = 1.5
  with pytest.raises(ValueError, match=r"config\.optimizer\.warmup_fraction=1\.5 must be in "
                                       r"\[0, 1\]"):
    config_lib.finalize(bad)


def test_one_size_knob_moves_the_other_sizes():
  """Hand-derived: DETR's recipe scaled to the size (0.6 x size .. size in steps of 32, cap
  size x 1333/800, crops size x (0.5, 0.625, 0.75) and x (0.48, 0.75))."""
  config = _load("dino_r50.py:")
  config.data.size = 1024
  d = config_lib.finalize(config).data
  assert tuple(d.scales) == tuple(range(640, 1025, 32))  # 0.6 x 1024 = 614.4 -> 640
  assert (d.max_size, d.eval_size, d.eval_max_size) == (1706, 1024, 1706)  # 1706.24
  assert (tuple(d.crop_scales), tuple(d.crop_size)) == ((512, 640, 768), (492, 768))
  assert tuple(map(tuple, d.buckets)) == ((1024, 1728), (1728, 1024), (1728, 1728))
  # The synthetic run: scales 0.8 x size .. size in steps of 16, square cap, eval at size - 16.
  config = _load("synthetic.py:")
  config.data.size = 256
  d = config_lib.finalize(config).data
  assert tuple(d.scales) == (208, 224, 240, 256)
  assert (d.max_size, d.eval_size, d.eval_max_size) == (256, 240, 256)
  assert tuple(map(tuple, d.buckets)) == ((256, 256),)
  # Each derived field stays overridable on its own.
  config.data.eval_size = 200
  config.data.max_size = 320
  d = config_lib.finalize(config).data
  assert (d.size, d.max_size, d.eval_size, d.eval_max_size) == (256, 320, 200, 320)


@pytest.mark.parametrize("overrides, message", [
    (dict(size=256, scales=(160, 192)),
     r"config\.data\.scales=\(160, 192\) contradicts config\.data\.size=256"),
    (dict(size=256, max_size=200),
     r"config\.data\.max_size=200 contradicts config\.data\.size=256"),
    (dict(eval_size=300, eval_max_size=250),
     r"config\.data\.eval_max_size=250 contradicts config\.data\.eval_size=300"),
    (dict(size=256, buckets=((192, 192),)),
     r"config\.data\.buckets=\(\(192, 192\),\) contradicts config\.data\.size=256"),
])
def test_contradicting_size_overrides_fail_naming_both_fields(overrides, message):
  config = _load("synthetic.py:")
  config.data.update(overrides)
  with pytest.raises(ValueError, match=message):
    config_lib.finalize(config)


def _coco_json(path, num_categories):
  Image.new("RGB", (50, 40)).save(path.parent / "a.png")
  cats = [{"id": 3 * k + 2, "name": f"thing{k}"} for k in range(num_categories)]
  path.write_text(json.dumps({
      "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [1, 2, 10, 12],
                       "area": 120.0, "iscrowd": 0}],
      "categories": cats}))
  return str(path)


def test_classes_come_from_the_training_json_and_the_labelbook_follows(tmp_path):
  (tmp_path / "birds" / "annotations").mkdir(parents=True)
  ann = _coco_json(tmp_path / "birds" / "annotations" / "train.json", 11)
  images = str(tmp_path / "birds" / "annotations")
  config = _load("coco_custom.py:cpu")
  config.data.update(dict(train_ann=ann, train_images=images, val_ann=ann, val_images=images))
  c = config_lib.finalize(config)
  assert (c.model.num_classes, c.model.dn_labelbook_size) == (11, 11)
  assert c.name == "birds_dino_cpu"
  assert config_lib.finalize(c).to_dict() == c.to_dict()
  assert config.model.num_classes is None  # the argument is not modified
  config.model.dn_labelbook_size = 4  # the data says 11 classes
  with pytest.raises(ValueError, match=r"^config\.model\.dn_labelbook_size=4 is smaller than "
                                       r"config\.model\.num_classes=11"):
    config_lib.finalize(config)


def test_unset_classes_without_a_training_json_name_both_fields():
  with pytest.raises(ValueError, match=r"config\.model\.num_classes is unset and "
                                       r"config\.data\.train_ann is empty"):
    config_lib.finalize(_load("coco_custom.py:"))


@pytest.mark.parametrize("spec", ["synthetic.py:", "dino_r50.py:tiny", "co_dino.py:smoke",
                                  "semi_detr.py:smoke"])
def test_every_config_checks_the_labelbook_before_reading_data(spec):
  """The issue's silent NaN: num_classes raised, dn_labelbook_size left at 4."""
  config = _load(spec)
  config.model.num_classes = 10
  config.model.dn_labelbook_size = 4
  config.data.root = "/nonexistent/never/read"
  with pytest.raises(ValueError) as err:
    config_lib.finalize(config)
  msg = str(err.value)
  assert "\n" not in msg
  assert "config.model.dn_labelbook_size=4" in msg and "config.model.num_classes=10" in msg


def test_synthetic_labelbook_follows_num_classes():
  config = _load("synthetic.py:")
  config.model.num_classes = 10
  config.data.root = "/nonexistent/never/read"  # num_classes is set: no data is read
  assert config_lib.finalize(config).model.dn_labelbook_size == 10


def test_study_accepts_runs_made_before_the_derivation_fields():
  """A run's config.json written before `data.size` / `*_fraction` existed still matches."""
  from sized_detr_jax.study import runner  # pylint: disable=g-import-not-at-top
  now = json.loads(config_lib.finalize(_load("synthetic.py:")).to_json_best_effort())
  old = copy.deepcopy(now)
  for section, key in (("data", "size"), ("data", "scale_step"), ("data", "min_scale_fraction"),
                       ("optimizer", "lr_drop_fractions"), ("optimizer", "warmup_fraction")):
    del old[section][key]
  assert runner.config_differences(old, now) == []
  old["optimizer"]["lr_drop_steps"] = [1000]
  assert runner.config_differences(old, now) == ["optimizer.lr_drop_steps"]


@pytest.mark.parametrize("ann, name", [
    ("/data/pets/annotations/instances_train.json", "pets"),  # generic folder: one higher
    ("/data/pets/train.json", "pets"),
    ("/annotations/train.json", "train"),  # no named folder: the file stem
    ("/train.json", "train"),
])
def test_dataset_name(ann, name):
  assert config_lib.dataset_name({"source": "coco", "train_ann": ann}) == name
  assert config_lib.dataset_name({"source": "synthetic"}) == "synthetic"


def test_library_functions_take_finalised_configs(tmp_path):
  """The entry points finalise once; train / evaluate / state refuse a raw config, naming
  themselves, before anything is created."""
  from sized_detr_jax import evaluate, state, train  # pylint: disable=g-import-not-at-top
  raw = _load("synthetic.py:smoke")
  workdir = str(tmp_path / "run")
  calls = {"train.train_and_evaluate": lambda: train.train_and_evaluate(raw, workdir),
           "evaluate.evaluate_only": lambda: evaluate.evaluate_only(raw, workdir),
           "state.setup": lambda: state.setup(raw, workdir)}
  for name, call in calls.items():
    with pytest.raises(ValueError, match=rf"{name}: the config is not finalised"):
      call()
  assert not os.path.exists(workdir)
  assert config_lib.finalize(raw).finalized and "finalized" not in raw


def test_dino_r50_criterion_is_dino_4scale():
  """dino_r50 states no criterion field: the CriterionConfig defaults are DINO_4scale.py's."""
  from sized_detr_jax import criterion  # pylint: disable=g-import-not-at-top
  c = criterion.CriterionConfig.from_config(_load("dino_r50.py:").criterion)
  assert (c.cls_loss_coef, c.bbox_loss_coef, c.giou_loss_coef) == (1.0, 5.0, 2.0)
  assert (c.set_cost_class, c.set_cost_bbox, c.set_cost_giou) == (2.0, 5.0, 2.0)
  assert (c.focal_alpha, c.focal_gamma, c.bbox_loss, c.sized_l1_rescale) == (0.25, 2.0, "l1",
                                                                             False)
