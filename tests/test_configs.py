"""The packaged configs: found by name and by path, every token in the one meaning table, and
`sized_l1` / `plain` giving the same loss in every config (no training, nothing compiled)."""
import os
import pathlib
import subprocess
import sys

import pytest

from sized_detr_jax import checkpointing
from sized_detr_jax import config_lib
from sized_detr_jax import configs

ROOT = pathlib.Path(__file__).resolve().parents[1]

# What each box-loss token must give, written down independently of configs/__init__.py:
# (criterion.bbox_loss, criterion.sized_l1_rescale).
RESCALED, PLAIN, L1 = ("sized_l1", True), ("sized_l1", False), ("l1", False)


def _loss(config):
  return config.criterion.bbox_loss, bool(config.criterion.sized_l1_rescale)


def _combinations():
  """(config name, arg): every token alone, and with each box-loss token the config has."""
  for name in configs.NAMES:
    tokens = configs.module(name).TOKENS
    box_tokens = [t for t in ("sized_l1", "plain", "sized_both", "sized_sup") if t in tokens]
    yield name, None
    for token in tokens:
      yield name, token
      for box in box_tokens:
        if box != token:
          yield name, f"{token},{box}"


@pytest.mark.parametrize("name", configs.NAMES)
def test_every_token_has_one_meaning_in_the_table(name):
  mod = configs.module(name)
  assert len(set(mod.TOKENS)) == len(mod.TOKENS)
  missing = [t for t in mod.TOKENS if t not in configs.TOKEN_MEANINGS]
  assert not missing, f"{name}: tokens without a meaning {missing}"
  assert mod.__doc__.strip()


def test_table_has_no_token_that_no_config_uses():
  used = {t for name in configs.NAMES for t in configs.module(name).TOKENS}
  assert set(configs.TOKEN_MEANINGS) == used


def _invalid(name, tokens):
  """Why a combination must be refused (a fragment of its one-line error), or None."""
  semi = name == "semi_detr" or "semi_detr" in tokens
  semi_sized = {"sized_both", "sized_sup"} & set(tokens)
  if name == "coco_custom" and {"co_dino", "semi_detr"} <= set(tokens):
    return "exclude each other"
  if semi_sized and not semi:
    return "is Semi-DETR's; add 'semi_detr'"
  if semi and "sized_l1" in tokens:
    return "with 'semi_detr' the Sized L1 tokens are 'sized_both'"
  if semi and "plain" in tokens and not semi_sized:
    return "'plain' needs sized_both or sized_sup"
  if name == "co_dino" and "small" in tokens and "synthetic" not in tokens:
    return "'small' .* needs 'synthetic'"
  return None


@pytest.mark.parametrize("name,arg", list(_combinations()))
def test_every_config_token_combination_resolves_to_its_loss(name, arg):
  tokens = (arg or "").split(",")
  why = _invalid(name, tokens)
  if why is not None:
    with pytest.raises(ValueError, match=why):
      config_lib.load_config(name, arg)
    return
  config = config_lib.load_config(name, arg)
  semi_sized = {"sized_both", "sized_sup"} & set(tokens)
  if "plain" in tokens:
    want = PLAIN
  elif "sized_l1" in tokens or semi_sized:
    want = RESCALED
  else:
    want = L1
  assert _loss(config) == want, (name, arg)
  if semi_sized:
    last = [t for t in tokens if t in ("sized_both", "sized_sup")][-1]  # the last given wins
    assert config.semi.sized_l1_branches == {"sized_both": "both", "sized_sup": "sup_only"}[last]


def test_finalize_resolves_every_token_alone():
  """Each config x single token also survives finalize (derived sizes, schedule, validation);
  coco_custom needs its data paths, so only its class-free fields are left unresolved."""
  for name in configs.NAMES:
    if name == "coco_custom":
      continue
    for token in (None, *configs.module(name).TOKENS):
      if _invalid(name, [token]):
        continue  # errors, checked above
      config_lib.finalize(config_lib.load_config(name, token))


def test_removed_rescale_token_is_a_one_line_error_naming_the_known_tokens():
  for name in ("synthetic", "dino_r50", "co_dino", "coco_custom", "semi_detr"):
    with pytest.raises(ValueError, match=rf"{name}: unknown variant tokens \['rescale'\]"):
      config_lib.load_config(name, "rescale")


def test_name_and_path_give_the_same_config():
  for name, arg in (("dino_r50", "tiny"), ("synthetic", "smoke"), ("co_dino", "synthetic")):
    by_name = config_lib.load_config(name, arg)
    by_package_path = config_lib.load_config(configs.path(name), arg)
    by_experiments_path = config_lib.load_config(str(ROOT / "experiments" / f"{name}.py"), arg)
    assert by_name.to_json() == by_package_path.to_json() == by_experiments_path.to_json()


def test_resolve_keeps_paths_and_existing_files(tmp_path):
  assert configs.resolve("dino_r50:coco91") == configs.path("dino_r50") + ":coco91"
  assert configs.resolve("synthetic") == configs.path("synthetic")
  assert configs.resolve("my/config.py:x") == "my/config.py:x"
  cwd = os.getcwd()
  try:  # a file named like a config, in the working folder, is the file
    os.chdir(tmp_path)
    (tmp_path / "synthetic").write_text("")
    assert configs.resolve("synthetic") == "synthetic"
  finally:
    os.chdir(cwd)
  with pytest.raises(ValueError, match="unknown config 'nope'; known: synthetic"):
    configs.path("nope")


def test_list_configs_prints_every_config_and_token_meaning():
  out = subprocess.run([sys.executable, "run.py", "--list-configs"], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  flat = " ".join(out.split())
  for name in configs.NAMES:
    assert f"{name}: " in out
    for token in configs.module(name).TOKENS:
      assert " ".join(f"{token} {configs.TOKEN_MEANINGS[token]}".split()) in flat, token


_flat = checkpointing._flat_config  # pylint: disable=protected-access


@pytest.mark.parametrize("name, base", [("synthetic", None), ("synthetic", "smoke"),
                                        ("co_dino", "synthetic")])
def test_small_token_changes_only_the_dataset(name, base):
  """`small` swaps the generated dataset (root, size mix) and the run's name, nothing else."""
  plain = _flat(config_lib.load_config(name, base).to_dict())
  small = _flat(config_lib.load_config(name, ",".join(filter(None, [base, "small"]))).to_dict())
  changed = {k for k in plain.keys() | small.keys() if plain.get(k) != small.get(k)}
  assert changed == {"data.root", "data.synthetic_size_mix", "name"}, changed
  assert small["data.root"] == plain["data.root"] + "_small"


# IDEA-Research/DINO config/DINO/DINO_4scale.py, written down by hand (the configs derive theirs
# from models.dino.DINO's field defaults): the model settings the paper's detector trains with.
DINO_4SCALE = dict(hidden_dim=256, nheads=8, dim_feedforward=2048, enc_layers=6, dec_layers=6,
                   num_queries=900, num_feature_levels=4, enc_n_points=4, dec_n_points=4,
                   backbone_blocks=(3, 4, 6, 3), pe_temperature=20.0, dn_number=100,
                   dn_box_noise_scale=0.4, dn_label_noise_ratio=0.5, num_select=300,
                   share_decoder_heads=True, num_backbone_levels=3)


def test_dino_r50_model_is_dino_4scale_with_contiguous_labels():
  model = configs.get("dino_r50").model
  assert {k: model[k] for k in DINO_4SCALE} == DINO_4SCALE
  # The pipeline's contiguous labels 0..79; `coco91` restores DINO's 91 category-id rows.
  assert (model.num_classes, model.dn_labelbook_size) == (80, 80)
  coco91 = configs.get("dino_r50", "coco91").model
  assert (coco91.num_classes, coco91.dn_labelbook_size) == (91, 91)
