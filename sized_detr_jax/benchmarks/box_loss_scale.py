r"""Initial magnitude of the box loss, L1 vs Sized L1 (plain and rescaled), on a config's data.

  python -m sized_detr_jax.benchmarks.box_loss_scale [--config=experiments/synthetic.py]
      [--config_arg=...] [--batches=8]

The freshly initialised model of `config.seed` is run on the first training batches; each
variant's final-layer `loss_bbox` (matched by the same Hungarian costs: the matcher keeps the L1
cost) is averaged over them. The printed factor `C = bbox_loss_coef * L1 / Sized L1` is the
Sized L1 coefficient whose initial weighted box loss equals L1's (the study's `sized_matched`
variant).
"""
import argparse
import dataclasses
import shutil
import tempfile

import jax
import numpy as np

from sized_detr_jax import config_lib
from sized_detr_jax import criterion
from sized_detr_jax import sharding
from sized_detr_jax import state as state_lib
from sized_detr_jax.data import batch as batch_lib

_CONFIG = "synthetic"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=_CONFIG)
  parser.add_argument("--config_arg", default=None)
  parser.add_argument("--batches", type=int, default=8)
  args = parser.parse_args(argv)
  config = config_lib.load_config(args.config, args.config_arg)
  config.num_devices = 1
  config = config_lib.finalize(config)
  workdir = tempfile.mkdtemp()  # an empty workdir: a fresh initialisation, nothing saved
  run = state_lib.setup(config, workdir)
  base = criterion.CriterionConfig.from_config(config.criterion)
  variants = {"l1": dataclasses.replace(base, bbox_loss="l1", sized_l1_rescale=False),
              "sized_l1": dataclasses.replace(base, bbox_loss="sized_l1", sized_l1_rescale=False),
              "sized_l1_rescale": dataclasses.replace(base, bbox_loss="sized_l1",
                                                      sized_l1_rescale=True)}
  state, model = run.state, run.method.model

  @jax.jit
  def losses(batch, rng):
    targets = batch_lib.model_targets(batch)
    outputs = model.apply({"params": state.params, **state.model_state},
                          batch_lib.model_images(batch), batch["pixel_mask"], targets=targets,
                          train=True, rngs={"dn": rng, "dropout": rng})
    return {name: criterion.dino_criterion(outputs, targets, cfg)["loss_bbox"]
            for name, cfg in variants.items()}

  batches = run.method.train_batches(config.data, seed=config.seed, start_step=0)
  values = {name: [] for name in variants}
  with jax.set_mesh(run.mesh):
    for k in range(args.batches):
      out = losses(sharding.global_batch(next(batches), run.mesh), jax.random.PRNGKey(k))
      for name, v in out.items():
        values[name].append(float(v))
  mean = {name: float(np.mean(v)) for name, v in values.items()}
  print(f"{args.config}:{args.config_arg or ''} seed {config.seed}, {args.batches} batches of "
        f"{config.data.batch_size}: initial final-layer loss_bbox (unweighted, mean)")
  for name, v in mean.items():
    print(f"  {name:18s} {v:.4f}")
  run.checkpointer.close()
  shutil.rmtree(workdir, ignore_errors=True)
  coef = base.bbox_loss_coef
  print(f"matched Sized L1 coefficient C = {coef} * l1 / sized_l1 = "
        f"{coef * mean['l1'] / mean['sized_l1']:.4f}")


if __name__ == "__main__":
  main()
