"""op_profile: HLO ops joined with their source lines, profiler time per op."""
import inspect
import time

import jax
import jax.numpy as jnp
import numpy as np

from sized_detr_jax import box_ops
from sized_detr_jax.benchmarks import op_profile


def _compiled():
  boxes = jnp.asarray(np.random.default_rng(0).uniform(0.1, 0.5, size=(256, 4)), jnp.float32)
  fn = jax.jit(jax.grad(lambda b: jnp.sum(box_ops.generalized_box_iou(
      box_ops.box_cxcywh_to_xyxy(b), box_ops.box_cxcywh_to_xyxy(b * 0.9)))))
  return fn.lower(boxes).compile(), boxes


def test_entry_ops_point_into_the_package_source():
  compiled, _ = _compiled()
  ops = op_profile.entry_ops(compiled.as_text())
  assert ops
  lines = inspect.getsource(box_ops).splitlines()
  sources = {op.source for op in ops.values() if op.source.startswith("box_ops.py:")}
  assert sources, {op.source for op in ops.values()}
  for source in sources:
    line = int(source.split(":")[1])  # 1-based
    assert 1 <= line <= len(lines)
    assert lines[line - 1].strip() and not lines[line - 1].lstrip().startswith("#")
  # Forward and backward ops read apart by their JAX names.
  names = [op.op_name for op in ops.values()]
  assert any("transpose(" in n for n in names) and any("transpose(" not in n for n in names)


def test_trace_op_times_names_the_compiled_ops():
  compiled, boxes = _compiled()
  run = lambda: jax.block_until_ready(compiled(boxes))
  run()
  times = op_profile.trace_op_times(run, steps=2)
  ops = op_profile.entry_ops(compiled.as_text())
  total = sum(times.values())
  assert total > 0
  known = sum(t for name, t in times.items() if name in ops)
  assert known >= 0.8 * total, sorted(times)
  by_category = op_profile.group_times(times, ops, "category")
  np.testing.assert_allclose(sum(by_category.values()), total, rtol=1e-9)


def test_trace_compile_events_lists_the_compilers_work():
  boxes = jnp.ones((16, 4), jnp.float32)
  lowered = jax.jit(lambda b: jnp.sum(box_ops.box_cxcywh_to_xyxy(b) ** 2)).lower(boxes)
  start = time.perf_counter()
  compiled, events = op_profile.trace_compile_events(lowered)
  wall = time.perf_counter() - start
  np.testing.assert_allclose(compiled(boxes), jnp.sum(box_ops.box_cxcywh_to_xyxy(boxes) ** 2))
  assert events and all(seconds >= 0 and count >= 1 for seconds, count in events.values())
  # The backend's compile entry point ran once, inside the measured call.
  once = {n: seconds for n, (seconds, count) in events.items() if "Compile" in n and count == 1}
  assert once, sorted(events)
  assert 0 < max(once.values()) <= wall
