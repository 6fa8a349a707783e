"""state.load_init_from: a fresh run starts its detector (and EMA teacher) from another run's
newest checkpoint (a supervised burn-in before Semi-DETR), nothing else."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax import checkpointing
from sized_detr_jax import sharding
from sized_detr_jax import state as state_lib


def _state(params, ema):
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                              opt_state={"mu": jax.tree.map(jnp.zeros_like, params)},
                              rng=jax.random.PRNGKey(0), ema_params=ema)


def _save(workdir, params, steps=(3, 5)):
  ckpt = checkpointing.Checkpointer(str(workdir), every=1, keep=5, async_save=False)
  for step in steps:
    scaled = jax.tree.map(lambda x: x * step, params)  # step 5 is the newest
    assert ckpt.maybe_save(step, _state(scaled, None), {"step": step})
  ckpt.close()


@pytest.mark.slow
def test_semi_run_starts_student_and_teacher_from_a_supervised_checkpoint(tmp_path):
  supervised = {"backbone": {"w": jnp.arange(6.0).reshape(2, 3)}, "head": {"b": jnp.ones(4)}}
  _save(tmp_path / "sup", supervised)
  fresh_dino = jax.tree.map(jnp.zeros_like, supervised)
  projector = {"fc": jnp.full((3,), 7.0)}
  state = _state({"dino": fresh_dino, "projector": projector}, {"dino": fresh_dino})
  mesh = sharding.make_mesh(1)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  ema_subtree = lambda p: {"dino": p["dino"]}
  out = state_lib.load_init_from(state, shardings, str(tmp_path / "sup"), ema_subtree)
  expected = jax.tree.map(lambda x: np.asarray(x) * 5, supervised)  # the newest step
  chex.assert_trees_all_equal(out.params["dino"], expected)
  chex.assert_trees_all_equal(out.ema_params["dino"], expected)
  chex.assert_trees_all_equal(out.params["projector"], projector)  # not a detector param
  chex.assert_trees_all_equal(out.opt_state, state.opt_state)  # optimiser state stays fresh
  assert int(out.step) == 0
  # The train step donates the whole state: student and teacher must not share a buffer.
  jax.block_until_ready(jax.jit(lambda s: jax.tree.map(lambda x: x + 0, s),
                                donate_argnums=0)(out))
  # A plain DINO run (no wrapper) loads the same way; a step folder works as the path.
  plain = state_lib.load_init_from(_state(fresh_dino, None), jax.tree.map(
      lambda _: sharding.replicated(mesh), _state(fresh_dino, None)),
      str(tmp_path / "sup" / "checkpoints" / "3"), lambda p: p)
  chex.assert_trees_all_equal(plain.params, jax.tree.map(lambda x: np.asarray(x) * 3,
                                                         supervised))


def test_init_from_errors_name_the_path_and_the_param(tmp_path):
  _save(tmp_path / "sup", {"w": jnp.ones((2, 3))})
  state = _state({"w": jnp.ones((2, 4))}, None)
  shardings = jax.tree.map(lambda _: sharding.replicated(sharding.make_mesh(1)), state)
  with pytest.raises(ValueError, match=r"params/w|w has shape \(2, 3\)"):
    state_lib.load_init_from(state, shardings, str(tmp_path / "sup"), lambda p: p)
  with pytest.raises(FileNotFoundError, match="no checkpoint step folder"):
    state_lib.load_init_from(state, shardings, str(tmp_path / "empty"), lambda p: p)


@pytest.mark.slow
def test_setup_loads_the_init_from_the_executable_cache_without_tracing_the_model(tmp_path):
  """state.setup twice with JAX's cache folder set: the first compiles the init as usual (the
  reference), the second loads it (the model is never traced) and gives the first's state, an
  optimiser of the same structure and the same schedule."""
  import os  # pylint: disable=import-outside-toplevel
  from absl.testing import absltest  # pylint: disable=import-outside-toplevel
  from sized_detr_jax import config_lib  # pylint: disable=import-outside-toplevel
  from sized_detr_jax import executable_cache  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.load_config(os.path.join(root, "experiments", "synthetic.py"), "smoke")
  config.data.root = str(tmp_path / "data")
  config.update(dict(num_devices=1))
  config = config_lib.finalize(config)
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
  try:
    reference = state_lib.setup(config, str(tmp_path / "cold"))
    assert len(list((tmp_path / "xla" / executable_cache.FOLDER).glob("init_state-*"))) == 1
    model_cls = type(reference.method.model)
    with absltest.mock.patch.object(model_cls, "init",
                                    side_effect=AssertionError("the model was traced")):
      warm = state_lib.setup(config, str(tmp_path / "warm"))
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)
  chex.assert_trees_all_equal(jax.device_get(warm.state), jax.device_get(reference.state))
  assert (jax.tree.structure(warm.tx.init(warm.state.params))
          == jax.tree.structure(reference.state.opt_state))
  assert [float(warm.schedule(s)) for s in (0, 1, 100)] == [
      float(reference.schedule(s)) for s in (0, 1, 100)]
