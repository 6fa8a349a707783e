"""The train_step benchmark's measuring parts: the host-callback timer, FLOPs, device peaks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax import matching
from sized_detr_jax.benchmarks import train_step


def test_callback_timer_counts_both_solvers_and_restores():
  real = (matching._solve_on_host, matching._solve_candidates_on_host)  # pylint: disable=protected-access
  full = jax.jit(matching.hungarian_matching)
  pruned = jax.jit(lambda c, v: matching.hungarian_matching(c, v, prune=True))
  cost = np.random.default_rng(0).normal(size=(2, 12, 3)).astype(np.float32)
  valid = np.ones((2, 3), bool)
  jax.block_until_ready((full(cost, valid), pruned(cost, valid)))  # compiled before timing
  timer = train_step.CallbackTimer()
  try:
    got = np.asarray(full(cost, valid)), np.asarray(pruned(cost, valid))
  finally:
    timer.close()
  assert timer.calls == 2 and timer.seconds > 0
  assert (matching._solve_on_host, matching._solve_candidates_on_host) == real  # pylint: disable=protected-access
  full(cost, valid)
  assert timer.calls == 2  # closed: no longer counting
  np.testing.assert_array_equal(got[0] >= 0, got[1] >= 0)


def test_compiled_flops_of_a_matmul_and_device_peaks():
  n = 32
  compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((n, n)), jnp.ones((n, n))).compile()
  assert train_step.compiled_flops(compiled) == 2 * n**3
  assert train_step.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert train_step.peak_tflops("TPU v5 lite") == 197.0
  assert train_step.peak_tflops("cpu") is None
  where, peak = train_step.peak_memory(jax.devices()[0])
  assert where == "process peak RSS" and peak > 10 * 2**20


def test_residual_groups_count_what_the_backward_keeps():
  """sum(tanh(x @ w)) keeps x (for w's gradient: 8 x 16 floats) and [8, 4] arrays for tanh's
  gradient; groups add up to the total, largest first."""
  x = jnp.ones((8, 16), jnp.float32)
  total, rows = train_step.residual_groups(lambda w: jnp.sum(jnp.tanh(x @ w)),
                                           jnp.ones((16, 4), jnp.float32))
  assert total == sum(r[0] for r in rows)
  assert (8 * 16 * 4, 1, "float32[8,16]") in [r[:3] for r in rows]
  others = [r for r in rows if r[2] != "float32[8,16]"]
  assert others and all(r[2] == "float32[8,4]" and r[0] == r[1] * 8 * 4 * 4 for r in others)
  assert rows == sorted(rows, reverse=True)


def test_compare_option_values_parse_to_xla_types():
  assert train_step._option_value("false") is False  # pylint: disable=protected-access
  assert train_step._option_value("True") is True  # pylint: disable=protected-access
  assert train_step._option_value("3") == 3  # pylint: disable=protected-access
  assert train_step._option_value("abc") == "abc"  # pylint: disable=protected-access


@pytest.mark.slow
def test_split_step_comparison_runs_both_steps_to_the_same_loss(capsys):
  """--split_step on a one-layer synthetic DINO: both steps compiled and timed; from the same
  state they give the same loss."""
  train_step.main(["--split_step", "--steps=1", "--batch=2", "--size=64x64", "--boxes=2",
                   "--set=model.enc_layers=1", "--set=model.dec_layers=1",
                   "--set=model.num_queries=8", "--set=model.num_select=8",
                   "--set=model.dn_number=2"])
  out = capsys.readouterr().out
  line = next(l for l in out.splitlines() if "one step from the same state" in l)
  callback, split = (float(v) for v in line.rsplit("loss ", 1)[1].split(" / "))
  np.testing.assert_allclose(split, callback, rtol=1e-5)
  assert "  callback " in out and "  split " in out and "ratio to callback" in out
