"""optim (AdamW groups vs a numpy AdamW), checkpointing (resume, corrupt fallback), metrics log."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sized_detr_jax import checkpointing
from sized_detr_jax import metrics_log
from sized_detr_jax import optim


def _opt_config(**kw):
  c = ml_collections.ConfigDict(dict(
      lr=1e-2, weight_decay=1e-1, clip_norm=0.0, lr_drop_steps=(2,), lr_drop_factor=0.1,
      lr_backbone_mult=0.1, lr_linear_proj_mult=0.5))
  c.update(kw)
  return c


def _params():
  rng = np.random.default_rng(0)
  mk = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"backbone": {"stem": {"kernel": mk(3, 2)}, "layer2": {"kernel": mk(2, 2)}},
          "decoder": {"sampling_offsets": {"kernel": mk(2, 3), "bias": mk(3)},
                      "head": {"kernel": mk(4, 2)}}}


def _np_adamw(p, grads, lr_at, mult, wd, steps, b1=0.9, b2=0.999, eps=1e-8):
  """PyTorch-style AdamW for one tensor (decoupled decay, bias correction), float64."""
  p, m, v = np.float64(p), 0.0, 0.0
  for t in range(steps):
    g = np.float64(grads[t])
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
    lr = lr_at(t) * mult
    p = p - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p)
  return p


def _labels(params):
  return {"backbone": {"stem": {"kernel": "frozen"}, "layer2": {"kernel": "backbone"}},
          "decoder": {"sampling_offsets": {"kernel": "linear_proj", "bias": "linear_proj"},
                      "head": {"kernel": "default"}}}


def test_param_groups_match_numpy_adamw():
  params = _params()
  cfg = _opt_config()
  tx, schedule = optim.make_optimizer(params, _labels(params), cfg)
  mult = optim.param_lr_multipliers(_labels(params), cfg)
  assert mult["backbone"]["stem"]["kernel"] == 0.0
  assert mult["backbone"]["layer2"]["kernel"] == 0.1
  assert mult["decoder"]["sampling_offsets"]["bias"] == 0.5
  assert mult["decoder"]["head"]["kernel"] == 1.0
  rng = np.random.default_rng(1)
  grads_seq = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
               for _ in range(4)]
  state, p = tx.init(params), params
  for g in grads_seq:
    updates, state = tx.update(g, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  lr_at = lambda t: 1e-2 if t < 2 else 1e-3
  for path in (("backbone", "stem", "kernel"), ("backbone", "layer2", "kernel"),
               ("decoder", "sampling_offsets", "bias"), ("decoder", "head", "kernel")):
    get = lambda tree: tree[path[0]][path[1]][path[2]]
    ref = _np_adamw(get(params), [get(g) for g in grads_seq], lr_at, get(mult), 0.1, 4)
    np.testing.assert_allclose(get(p), ref, rtol=1e-5, atol=1e-7)
  assert float(schedule(1)) == pytest.approx(1e-2) and float(schedule(2)) == pytest.approx(1e-3)


def test_clip_and_warmup():
  params = _params()
  tx, schedule = optim.make_optimizer(params, _labels(params), _opt_config(clip_norm=0.1, warmup_steps=4))
  # Warm-up 4 and the drop at step 2 (absolute): 1e-2 x 0.1 x 2/4 at step 2.
  assert float(schedule(0)) == 0.0 and float(schedule(2)) == pytest.approx(5e-4)
  # Drop steps are absolute, also with a warm-up (optax.join_schedules would shift them).
  late = optim.lr_schedule(_opt_config(warmup_steps=4, lr_drop_steps=(6,)))
  assert [float(late(t)) for t in (2, 4, 5, 6, 10)] == pytest.approx([5e-3, 1e-2, 1e-2, 1e-3, 1e-3])
  huge = jax.tree.map(lambda x: 1e6 * jnp.ones_like(x), params)
  updates, _ = tx.update(huge, tx.init(params), params)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  # Frozen gradients are zeroed before clipping: they do not enter the clipped norm.
  clip_only = optax.chain(optim.zero_frozen(_labels(params)), optax.clip_by_global_norm(1.0))
  grads = jax.tree.map(jnp.ones_like, params)
  grads["backbone"]["stem"]["kernel"] = 1e6 * grads["backbone"]["stem"]["kernel"]
  clipped, _ = clip_only.update(grads, clip_only.init(params), params)
  n_trainable = sum(x.size for x in jax.tree.leaves(params)) - 6
  np.testing.assert_allclose(clipped["decoder"]["head"]["kernel"], 1 / np.sqrt(n_trainable), rtol=1e-5)
  assert np.all(clipped["backbone"]["stem"]["kernel"] == 0)
  # train_all_backbone: the frozen group trains at the backbone rate.
  tx_all, _ = optim.make_optimizer(params, _labels(params), _opt_config(train_all_backbone=True))
  upd, _ = tx_all.update(grads, tx_all.init(params), params)
  assert np.all(upd["backbone"]["stem"]["kernel"] != 0)
  with pytest.raises(ValueError, match="unknown parameter group 'oops'"):
    optim.param_lr_multipliers({"a": "oops"}, _opt_config())


def test_checkpoint_resume_and_corrupt_fallback(tmp_path):
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(0, jnp.int32)}
  ckpt = checkpointing.Checkpointer(str(tmp_path), every=2, keep=3, async_save=False)
  assert ckpt.restore_latest(checkpointing.abstract_like(state)) is None
  assert not ckpt.maybe_save(1, state, {"step": 1})  # not a multiple of `every`
  for step in (2, 4):
    s = {"w": state["w"] + step, "step": jnp.asarray(step, jnp.int32)}
    assert ckpt.maybe_save(step, s, {"step": step})
  ckpt.wait()
  step, restored, meta = ckpt.restore_latest(checkpointing.abstract_like(state))
  assert step == 4 and meta == {"step": 4}
  np.testing.assert_array_equal(restored["w"], state["w"] + 4)
  ckpt.close()
  # Corrupt every file of the newest checkpoint's state: restore falls back to step 2.
  state_dir = os.path.join(ckpt.directory, "4", "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  ckpt2 = checkpointing.Checkpointer(str(tmp_path), every=2, keep=3, async_save=False)
  step, restored, _ = ckpt2.restore_latest(checkpointing.abstract_like(state))
  assert step == 2
  np.testing.assert_array_equal(restored["w"], state["w"] + 2)
  ckpt2.close()


def test_metrics_log_appends_across_runs(tmp_path):
  for start in (0, 10):  # a run, then a run resumed from step 10 in the same workdir
    log = metrics_log.MetricsLog(str(tmp_path), total_steps=20, start_step=start,
                                 tensorboard=False)
    for step in (start + 5, start + 10):
      rec = log.write(step, {"loss": 1.0 / step, "loss_ce": 0.5, "lr": 1e-4}, images_per_step=2)
    log.close()
  lines = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert [l.get("step", l.get("event")) for l in lines] == [5, 10, "resume", 15, 20]
  assert lines[2]["from_step"] == 10
  assert lines[1]["loss"] == pytest.approx(0.1) and "img_per_s" in lines[1]
  assert "step 20/20" in metrics_log.format_progress(rec, 20)
