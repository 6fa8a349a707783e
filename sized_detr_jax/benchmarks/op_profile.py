"""Where a compiled XLA program spends its time, per HLO op, with the source line behind it.

  times = trace_op_times(lambda: compiled(*args), steps=3)      # {thunk name: seconds per step}
  ops = entry_ops(compiled.as_text())                            # {name: HloOp}
  print_op_table(times, ops, top=25)

XLA's CPU runtime records one profiler event per executed op (thunk) of the entry computation,
named after the HLO instruction (`convolution.12`, `loop_fusion.3`); on GPUs the events are
kernels, which join with fewer instructions (the unjoined show as "(name)"). This
file runs the function under `jax.profiler`, sums those events per name with
`jax.profiler.ProfileData` (no TensorBoard needed), and joins them with the optimized HLO text:
each entry instruction's opcode / fusion kind, JAX op name (`jit(step)/transpose(jvp())/...`,
so forward and backward read apart) and the innermost stack frame in this package (file:line).
Tables group by op category, by source line and by single op.
"""
import collections
import dataclasses
import glob
import os
import re
import tempfile
from typing import Callable, Dict, Optional

import jax

_PACKAGE = "sized_detr_jax"
# Runtime bookkeeping events (not ops) on the executor threads.
_NOT_OPS = re.compile(r"^(end: |ThunkExecutor|ThreadpoolListener|SlinkyThreadPool|"
                      r"PjRt|Execute|Thunk|Await)")


@dataclasses.dataclass(frozen=True)
class HloOp:
  """One instruction of the entry computation."""
  name: str
  category: str  # opcode, or fusion kind ("fusion:kLoop", "fusion:__ynn_fusion")
  op_name: str  # JAX name stack, e.g. "jit(step)/transpose(jvp())/dot_general"
  source: str  # innermost frame in this package, "models/msda.py:97", else "[dir/file.py:N]"
  # (the innermost frame JAX kept, outside the package), or "" without metadata


def _table(section, text):
  """{id: body} of a `Name\\nid {body}` table in the HLO text header (FileNames, ...)."""
  match = re.search(rf"^{section}\n((?:\d+ .*\n)+)", text, re.M)
  rows = {}
  for line in (match.group(1).splitlines() if match else ()):
    key, body = line.split(" ", 1)
    rows[int(key)] = body.strip()
  return rows


def _field(body, key):
  match = re.search(rf"\b{key}=(\d+)", body)
  return int(match.group(1)) if match else None


def _sources(text):
  """{stack_frame_id: "path:line" of the innermost frame inside this package}."""
  files = {k: v.strip('"') for k, v in _table("FileNames", text).items()}
  locations = {k: (files.get(_field(v, "file_name_id"), ""), _field(v, "line"))
               for k, v in _table("FileLocations", text).items()}
  frames = {k: (_field(v, "file_location_id"), _field(v, "parent_frame_id"))
            for k, v in _table("StackFrames", text).items()}
  out = {}
  for frame_id in frames:
    current, seen, innermost = frame_id, set(), ""
    while current in frames and current not in seen:
      seen.add(current)
      location, parent = frames[current]
      path, line = locations.get(location, ("", None))
      if f"{_PACKAGE}/" in path:
        out[frame_id] = f"{path.split(f'{_PACKAGE}/', 1)[1]}:{line}"
        break
      # JAX keeps a few frames per op; deep library stacks may not reach the package.
      innermost = innermost or f"[{'/'.join(path.split('/')[-2:])}:{line}]"
      current = parent
    else:
      out[frame_id] = innermost
  return out


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+(?: \S+)*? ([a-z][\w\-]*)\(")


def _computations(hlo_text):
  """{computation name: its instruction lines}, ENTRY's under "ENTRY"."""
  out, name = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$", line)
    if header:
      name = "ENTRY" if header.group(1) else header.group(2)
      out[name] = []
    elif line.startswith("}"):
      name = None
    elif name is not None:
      out[name].append(line)
  return out


def _metadata(lines):
  """(op_name, stack_frame_id) of the first line that has them (the ROOT first)."""
  ordered = sorted(lines, key=lambda line: not line.lstrip().startswith("ROOT"))
  for line in ordered:
    op_name = re.search(r'op_name="([^"]*)"', line)
    if op_name:
      return op_name.group(1), _field(line, "stack_frame_id")
  return "", None


def entry_ops(hlo_text: str) -> Dict[str, HloOp]:
  """{instruction name: HloOp} for the ENTRY computation of an optimized HLO module text.

  An instruction without metadata of its own (XLA drops it on some fusions) takes that of the
  computation it calls (its root first).
  """
  sources = _sources(hlo_text)
  computations = _computations(hlo_text)
  if "ENTRY" not in computations:
    raise ValueError("entry_ops: no ENTRY computation in the HLO text")
  ops = {}
  for line in computations["ENTRY"]:
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, opcode = match.groups()
    category = opcode
    if opcode == "fusion":
      kind = re.search(r'"kind":"([^"]+)"', line) or re.search(r"kind=(\w+)", line)
      category = f"fusion:{kind.group(1)}" if kind else "fusion"
    op_name, frame = _metadata([line])
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if not op_name and called:
      op_name, frame = _metadata(computations.get(called.group(1), []))
    ops[name] = HloOp(name, category, op_name,
                      sources.get(frame, "") if frame is not None else "")
  return ops


def trace_op_times(run: Callable[[], object], steps: int,
                   logdir: Optional[str] = None) -> Dict[str, float]:
  """Seconds per call of `run` spent in each named runtime op (summed over threads).

  `run` must block until its results are ready (e.g. end in `jax.block_until_ready`); call it
  once before to exclude compilation. Events of the Python thread are not ops and are left out.
  """
  if steps < 1:
    raise ValueError(f"trace_op_times: steps must be >= 1, got {steps}")

  def run_steps():
    for _ in range(steps):
      run()

  totals = collections.Counter()
  for name, (ns, _) in _traced_events(run_steps, logdir).items():
    if not _NOT_OPS.match(name):
      totals[name] += ns
  return {name: ns / 1e9 / steps for name, ns in totals.items()}


def trace_compile_events(lowered, logdir: Optional[str] = None):
  """Compiles `lowered` (a `jax.stages.Lowered`) under the profiler.

  Returns:
    (compiled, {event name: (seconds, count)}): the XLA compiler's own events, summed over
    its threads (passes such as "HLO passes through layout assignment (jit_f)", "copy-
    insertion", the backend's "Codegen" / "FusionCompiler::Compile", ...; names depend on the
    backend). Nested events each count, so the seconds do not add up to the compile time.
  """
  out = {}

  def compile_it():
    out["compiled"] = lowered.compile()

  events = _traced_events(compile_it, logdir)
  return out["compiled"], {name: (ns / 1e9, count) for name, (ns, count) in events.items()}


def _traced_events(run: Callable[[], object], logdir: Optional[str]):
  """{event name: (total ns, count)} of every profiler event outside the Python thread while
  `run()` runs (read back with jax.profiler.ProfileData)."""
  with tempfile.TemporaryDirectory() as tmp:
    folder = logdir or tmp
    jax.profiler.start_trace(folder)
    try:
      run()
    finally:
      jax.profiler.stop_trace()
    paths = sorted(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
      raise RuntimeError(f"op_profile: the profiler wrote no .xplane.pb under {folder}")
    data = jax.profiler.ProfileData.from_file(paths[-1])
    totals, counts = collections.Counter(), collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        if line.name == "python":
          continue
        for event in line.events:
          totals[event.name] += event.duration_ns
          counts[event.name] += 1
  return {name: (ns, counts[name]) for name, ns in totals.items()}


def group_times(times: Dict[str, float], ops: Dict[str, HloOp], key: str) -> Dict[str, float]:
  """Sums `times` by an HloOp field ("category", "source", "op_name"); unknown names by name."""
  out = collections.Counter()
  for name, seconds in times.items():
    op = ops.get(name)
    out[(getattr(op, key) or "?") if op else f"({name})"] += seconds
  return dict(out)


def _direction(op_name):
  if not op_name:
    return "?"
  return "backward" if "transpose(" in op_name else "forward"


def print_op_table(times: Dict[str, float], ops: Dict[str, HloOp], top: int = 20,
                   step_s: Optional[float] = None):
  """Prints the op time per step by category, by forward/backward, by source line and by op."""
  total = sum(times.values())
  ref = step_s or total
  print(f"op time per step {total:.3f} s (summed over threads)"
        + (f"; step wall time {step_s:.3f} s" if step_s else ""))
  by_direction = collections.Counter()
  for name, seconds in times.items():
    by_direction[_direction(ops[name].op_name if name in ops else "")] += seconds
  # A fusion carries one JAX name (its root's), so this split is approximate.
  print("  by JAX name (transpose(...) = backward; fusions named by their root): " + ", ".join(
      f"{k} {v:.3f} s" for k, v in by_direction.most_common()))
  for title, key in (("category", "category"), ("source line (innermost frame in the package)",
                                                 "source")):
    print(f"by {title}:")
    for label, seconds in collections.Counter(group_times(times, ops, key)).most_common(top):
      print(f"  {seconds:8.3f} s {seconds / ref:6.1%}  {label}")
  print("by op:")
  for name, seconds in collections.Counter(times).most_common(top):
    op = ops.get(name)
    detail = f"{op.category:22s} {op.source:34s} {op.op_name[-70:]}" if op else ""
    print(f"  {seconds:8.3f} s {seconds / ref:6.1%}  {name:28s} {detail}")
