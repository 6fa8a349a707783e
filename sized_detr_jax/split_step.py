"""The train step split at the host matching: two jitted executables, no host callback.

The one-executable step (`train.make_train_step`) solves the Hungarian matching with a
`jax.pure_callback` inside the jitted step. JAX neither writes an executable with a host
callback to the persistent compilation cache nor gives it its C++ dispatch path, so that step
compiles on every start and checks its arguments in Python on every call. `SplitStep` (on with
`config.split_step=True`) runs the same step as

  1. `forward` (jitted): everything that does not depend on the matches (the model's forward
     passes, the matching costs, the vjp residuals), returning the costs and the residuals;
  2. the host solve of every matching problem (`matching.solve_host_problem`, outside jit);
  3. `update` (jitted): the rest (criterion, backward pass, optimiser and EMA update) from the
     residuals and the matches, returning the new state (donated) and the metrics.

No method declares anything: a method matches with `matching.hungarian_matching`, and
`SplitStep` finds those calls by tracing the method's loss with `matching.deferred_matching`
(each call's matches become an input of the step), then splits the traced step by data
dependence on those inputs (JAX's partial evaluation, as `jax.linearize` splits a function into
its primal and tangent parts). The problems of one step must be independent: a matching cost
that depends on another matching's result cannot be computed before the host solve, and is an
error naming it. Randomness, losses and updates are those of the one-executable step.

With `cache_key` given and JAX's persistent compilation cache on, the two executables and what
the step needs besides them are also kept in `executable_cache` under a key computed without
tracing (the caller's `cache_key`, the arguments' layout, the package source, library versions,
backend, flags): a warm start loads them without tracing, splitting or lowering the step. An
entry that cannot be used is skipped with one line in the log, and the step compiled.

Single process only (the host solve reads the whole global cost arrays); several devices of one
process work. With several processes, or problems that depend on each other, the trainer runs
the one-executable step with the host callback instead (`SplitStep`'s `fallback`, the reason
logged).
"""
import os
import time
import types
from typing import Any, Callable, Optional

from absl import logging
import jax
# JAX's partial evaluation (what jax.linearize and jax.vjp are built on) has no public entry
# point that takes a jaxpr (checked on jax 0.10; tests/test_split_step.py catches a change).
from jax._src import core as jax_core
from jax._src.interpreters import partial_eval as pe
import jax.numpy as jnp
import numpy as np

from sized_detr_jax import executable_cache
from sized_detr_jax import matching
from sized_detr_jax import sharding

# The metrics key that carries the matching problems out of the differentiated loss.
_PROBLEMS = "__matching_problems__"


def _problem_shapes(loss_fn, state, batch):
  """The [..., G] int32 match arrays of every `hungarian_matching` call of one loss, in order."""
  shapes = []

  def handler(cost, gt_valid, prune):
    del cost, prune
    shapes.append(jax.ShapeDtypeStruct(gt_valid.shape, jnp.int32))
    return jnp.full(gt_valid.shape, -1, jnp.int32)

  with matching.deferred_matching(handler):
    jax.eval_shape(lambda s, b: loss_fn(s.params, s, b, s.rng), state, batch)
  return shapes


class SplitStep:
  """`train.make_train_step`'s step with the host matching between two jitted executables.

  Used like a jitted step in the trainer: `SplitStep(...).lower(state, batch).compile()` gives
  `(state, batch) -> (state, metrics)` (state donated).
  """

  def __init__(self, loss_fn: Callable[..., Any], make_step: Callable[[Any], Any],
               mesh: jax.sharding.Mesh, state_shardings: Any,
               fallback: Optional[Callable[[], Any]] = None, cache_key: Any = None):
    """
    Args:
      loss_fn: `(params, state, batch, rng) -> (loss, metrics)` (a `Method.loss_fn(stage)`).
      make_step: loss_fn -> the pure step `(state, batch) -> (state, metrics)`
        (`train.train_step_fn` with the optimiser bound).
      mesh, state_shardings: the mesh (batch sharded on `data`) and the TrainState's shardings.
      fallback: () -> the one-executable jitted step (`train.make_train_step`), which `lower`
        lowers instead, with the reason logged, where the split cannot run (several processes,
        matching problems that depend on each other) or is not needed (no matching problem).
        None: those cases raise.
      cache_key: None, or what determines `loss_fn` and `make_step` (a repr-able value: the
        trainer gives the finalised config, the data info, the stage and the step options),
        which turns on the executable cache (see the module doc). It must change whenever
        the traced step would; the arguments' layout and the code are added to it here.
    """
    self._loss_fn, self._make_step, self._fallback = loss_fn, make_step, fallback
    self._mesh, self._state_shardings = mesh, state_shardings
    self._cache_key = cache_key

  def _cache_path(self, state, batch):
    if self._cache_key is None or executable_cache.folder() is None:
      return None
    return executable_cache.path_for("split_step", executable_cache.key(
        "split_step", self._cache_key, executable_cache.arguments_layout((state, batch)),
        repr(self._mesh), self._mesh.device_ids.tolist(),
        [repr(s) for s in jax.tree.leaves(self._state_shardings)]))

  def _load(self, path, state, batch):
    """The cached `CompiledSplitStep` for these arguments, or None (not there, or not usable:
    one line logged, the entry removed)."""
    start = time.perf_counter()

    def check(entry):
      compiled = CompiledSplitStep(**entry, replicated=sharding.replicated(self._mesh))
      compiled.check_arguments(state, batch)
      return compiled

    compiled = executable_cache.load_usable(path, "split step", check)
    if compiled is not None:
      logging.info("Split step: forward and update loaded from %s in %.1f s (no tracing).",
                   os.path.basename(path), time.perf_counter() - start)
    return compiled

  def _fall_back(self, reason, state, batch, *, error=True):
    if self._fallback is None:
      if not error:
        return None
      raise ValueError(f"split_step: {reason}; this step needs split_step=False (the host "
                       "callback inside the step)")
    (logging.warning if error else logging.info)(
        "split_step: %s; using the one-executable step%s.", reason,
        " (with the host callback)" if error else "")
    return self._fallback().lower(state, batch)

  def _step_with_matches(self, state, batch, matches):
    """The step with the given matches; also returns each matching problem (host arrays to
    solve and gt_valid)."""
    found = []

    def handler(cost, gt_valid, prune):
      if len(found) >= len(matches):
        raise RuntimeError("split_step: the loss made more matching calls than when its problems "
                           "were counted (a loss must trace the same way every time)")
      match = matches[len(found)]
      if match.shape != gt_valid.shape:
        raise RuntimeError(f"split_step: matching call {len(found)} has shape {gt_valid.shape}, "
                           f"counted {match.shape}")
      found.append((matching.host_problem(cost, prune), gt_valid))
      return match

    def loss_fn(params, st, b, rng):
      with matching.deferred_matching(handler):
        loss, metrics = self._loss_fn(params, st, b, rng)
      return loss, {**metrics, _PROBLEMS: tuple(found)}

    new_state, metrics = self._make_step(loss_fn)(state, batch)
    metrics = dict(metrics)
    problems = metrics.pop(_PROBLEMS)
    if len(problems) != len(matches):
      raise RuntimeError(f"split_step: the loss made {len(problems)} matching calls, counted "
                         f"{len(matches)}")
    return problems, (new_state, metrics)

  def lower(self, state, batch) -> "LoweredSplitStep":
    """Traces the step for this (state, batch) layout and splits it at the matching (or
    lowers the fallback step, see `__init__`).

    Raises:
      ValueError: without a fallback, where the split cannot run.
    """
    if jax.process_count() > 1:
      return self._fall_back("several processes (the host solve reads the global matching "
                             "costs, one process only)", state, batch)
    cache_path = self._cache_path(state, batch)
    if cache_path is not None:
      compiled = self._load(cache_path, state, batch)
      if compiled is not None:
        return _Loaded(compiled)
    start = time.perf_counter()
    match_shapes = _problem_shapes(self._loss_fn, state, batch)
    if not match_shapes:
      lowered = self._fall_back("the loss makes no host matching call", state, batch,
                                error=False)
      if lowered is not None:
        return lowered
    closed, out_shape = jax.make_jaxpr(self._step_with_matches, return_shape=True)(
        state, batch, match_shapes)
    traced = time.perf_counter()
    num_known = len(jax.tree.leaves((state, batch)))
    problems_shape, rest_shape = out_shape
    num_problem_leaves = len(jax.tree.leaves(problems_shape))
    num_rest = len(jax.tree.leaves(rest_shape))
    unknowns = [False] * num_known + [True] * len(match_shapes)
    known, unknown, out_unknowns, _, fwds = pe.partial_eval_jaxpr_nounits_fwd(
        closed, unknowns, instantiate=[False] * num_problem_leaves + [True] * num_rest,
        fwd=True)
    if any(out_unknowns[:num_problem_leaves]):
      return self._fall_back("a matching cost depends on another matching's result", state,
                             batch)
    logging.info("Split step: %d matching problem(s); traced in %.1f s, split in %.1f s.",
                 len(match_shapes), traced - start, time.perf_counter() - traced)
    return LoweredSplitStep(self, state, batch, dict(
        known=known, unknown=unknown, fwds=fwds, consts=closed.consts,
        problems_tree=jax.tree.structure(problems_shape),
        rest_tree=jax.tree.structure(rest_shape), num_problem_leaves=num_problem_leaves,
        match_shapes=match_shapes), cache_path=cache_path)


class _Loaded:
  """`lower()`'s result where the executables came from the cache: `compile()` returns them."""

  def __init__(self, compiled):
    self._compiled = compiled

  def compile(self) -> "CompiledSplitStep":
    return self._compiled


class LoweredSplitStep:
  """The traced, split step; `compile()` compiles its two executables (and keeps them in the
  executable cache when `cache_path` is given)."""

  def __init__(self, split, state, batch, parts, cache_path=None):
    self._split, self._state, self._batch, self._parts = split, state, batch, parts
    self._cache_path = cache_path

  def compile(self) -> "CompiledSplitStep":
    split, parts = self._split, self._parts
    mesh = split._mesh  # pylint: disable=protected-access
    known_args = jax.tree.leaves((self._state, self._batch))
    state_shardings = jax.tree.leaves(split._state_shardings)  # pylint: disable=protected-access
    batch_shardings = [sharding.batch_sharding(mesh)] * len(jax.tree.leaves(self._batch))
    known_shardings = state_shardings + batch_shardings
    start = time.perf_counter()
    with executable_cache.jax_cache_hits() as hits:  # fresh compiles only are kept
      forward = jax.jit(lambda *args: jax_core.jaxpr_as_fun(parts["known"])(*args),
                        in_shardings=known_shardings).lower(*known_args).compile()

      # The update's residual inputs: forward's outputs, or known inputs / constants passed on.
      num_consts, num_state = len(parts["consts"]), len(state_shardings)
      computed = iter(range(parts["num_problem_leaves"], len(forward.output_shardings)))
      sources, donate, seen = [], [], set()
      for i, f in enumerate(parts["fwds"]):
        if f is None:  # not donated: no output has a residual's buffer to reuse
          sources.append(("out", next(computed)))
        elif f < num_consts:
          sources.append(("const", f))
        else:
          sources.append(("in", f - num_consts))
          if f - num_consts < num_state and f not in seen:  # the state is donated, the batch not
            donate.append(i)
          seen.add(f)

      def residual_sharding(kind, index):
        if kind == "out":
          return forward.output_shardings[index]
        if kind == "in":
          return known_shardings[index]
        return sharding.replicated(mesh)

      res_avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=residual_sharding(*s))
                   for a, s in zip(parts["unknown"].in_avals, sources)]
      replicated = sharding.replicated(mesh)
      match_avals = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated)
                     for s in parts["match_shapes"]]
      num_metrics = parts["rest_tree"].num_leaves - num_state
      update = jax.jit(lambda *args: jax_core.jaxpr_as_fun(parts["unknown"])(*args),
                       out_shardings=state_shardings + [replicated] * num_metrics,
                       donate_argnums=tuple(donate)).lower(*res_avals, *match_avals).compile()
    logging.info("Split step: forward and update lowered and compiled (or loaded from the "
                 "compilation cache) in %.1f s; %d residual arrays pass between them.",
                 time.perf_counter() - start, len(sources))
    compiled = CompiledSplitStep(
        forward, update, sources, problems_tree=parts["problems_tree"],
        rest_tree=parts["rest_tree"], num_problem_leaves=parts["num_problem_leaves"],
        consts=parts["consts"], replicated=replicated)
    if self._cache_path is not None:
      start = time.perf_counter()
      if executable_cache.keep_if_fresh(self._cache_path, compiled.cache_entry(), hits,
                                        "the split step"):
        logging.info("Split step: executables kept in the cache in %.1f s.",
                     time.perf_counter() - start)
    return compiled


class CompiledSplitStep:
  """`(state, batch) -> (state, metrics)`: forward, host solve, update (state donated).

  `forward` and `update` are the two `jax.stages.Compiled` executables.
  """

  def __init__(self, forward, update, sources, *, problems_tree, rest_tree, num_problem_leaves,
               consts, replicated):
    self.forward, self.update = forward, update
    self._sources, self._replicated = sources, replicated
    self._parts = dict(problems_tree=problems_tree, rest_tree=rest_tree,
                       num_problem_leaves=num_problem_leaves,
                       consts=[jax.device_put(c, replicated) for c in consts])

  def cache_entry(self) -> dict:
    """The constructor's arguments, the constants as numpy arrays (for `executable_cache`)."""
    return dict(forward=self.forward, update=self.update, sources=self._sources,
                **{**self._parts, "consts": [np.asarray(c) for c in self._parts["consts"]]})

  def check_arguments(self, state, batch):
    """Raises ValueError unless (state, batch) has the forward's input shapes and dtypes."""
    args = jax.tree.leaves((state, batch))
    expected = jax.tree.leaves(self.forward.args_info)
    if len(args) != len(expected):
      raise ValueError(f"{len(args)} arguments, the executable takes {len(expected)}")
    for i, (x, info) in enumerate(zip(args, expected)):
      aval = info._aval  # pylint: disable=protected-access
      if tuple(x.shape) != tuple(aval.shape) or x.dtype != aval.dtype:
        raise ValueError(f"argument {i} is {x.dtype}{list(x.shape)}, the executable takes "
                         f"{aval.dtype}{list(aval.shape)}")

  @property
  def input_shardings(self):
    """The forward's (the step's state and batch), as `Compiled.input_shardings`."""
    return self.forward.input_shardings

  def memory_analysis(self) -> types.SimpleNamespace:
    """The step's footprint in the fields of `Compiled.memory_analysis()` that the memory
    preflight reads (arguments + outputs - donated + temporaries): the forward's arguments and
    outputs (the residuals live until the update ends), plus the larger of the forward's
    temporaries and the update's outputs - donated + temporaries."""
    f, u = self.forward.memory_analysis(), self.update.memory_analysis()
    update_extra = u.output_size_in_bytes - u.alias_size_in_bytes + u.temp_size_in_bytes
    return types.SimpleNamespace(
        argument_size_in_bytes=f.argument_size_in_bytes,
        output_size_in_bytes=f.output_size_in_bytes, alias_size_in_bytes=0,
        temp_size_in_bytes=max(f.temp_size_in_bytes, update_extra))

  def __call__(self, state, batch):
    parts = self._parts
    known_args = jax.tree.leaves((state, batch))
    outs = self.forward(*known_args)
    problems = jax.tree.unflatten(parts["problems_tree"], outs[:parts["num_problem_leaves"]])
    problems = jax.device_get(problems)
    matches = [jax.device_put(matching.solve_host_problem(problem, gt_valid), self._replicated)
               for problem, gt_valid in problems]
    residuals = [outs[i] if kind == "out" else known_args[i] if kind == "in"
                 else parts["consts"][i] for kind, i in self._sources]
    rest = self.update(*residuals, *matches)
    return jax.tree.unflatten(parts["rest_tree"], rest)
