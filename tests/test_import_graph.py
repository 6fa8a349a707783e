"""The package's import graph (read with `ast`, nothing imported): no cycles, nothing but the
command line (cli.py, behind run.py) and the benchmarks imports the trainer, Co-DINO's model and criterion are independent, and the
trainer names no method."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "sized_detr_jax"


def _module_name(path):
  rel = path.relative_to(ROOT).with_suffix("")
  parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
  return ".".join(parts)


def _modules():
  return {_module_name(p): p for p in (ROOT / PACKAGE).rglob("*.py")}


def _imports(path, name, known):
  """Package modules imported anywhere in the file (top level or inside functions)."""
  tree = ast.parse(path.read_text(), str(path))
  is_package = path.name == "__init__.py"
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = name.split(".")
        anchor = anchor if is_package else anchor[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      if base.split(".")[0] != PACKAGE:
        continue
      for alias in node.names:  # `from pkg import mod` imports a module, else the name's module
        sub = f"{base}.{alias.name}"
        found.add(sub if sub in known else base)
  return found


def _graph():
  modules = _modules()
  return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycle(graph):
  """One import cycle as a list of modules, or None (iterative DFS)."""
  state = {}
  for start in graph:
    if state.get(start):
      continue
    stack = [(start, iter(sorted(graph[start])))]
    path = [start]
    state[start] = 1
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        state[node] = 2
        stack.pop()
        path.pop()
      elif state.get(child) == 1:
        return path[path.index(child):] + [child]
      elif child in graph and not state.get(child):
        state[child] = 1
        path.append(child)
        stack.append((child, iter(sorted(graph[child]))))
  return None


def test_cycle_finder_finds_a_planted_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
  graph = _graph()
  assert len(graph) > 40  # the walk found the package
  assert _cycle(graph) is None, _cycle(graph)


def test_only_the_cli_and_benchmarks_import_the_trainer():
  graph = _graph()
  importers = sorted(m for m, deps in graph.items() if f"{PACKAGE}.train" in deps)
  assert f"{PACKAGE}.cli" in importers
  assert all(m.startswith(f"{PACKAGE}.benchmarks") or m == f"{PACKAGE}.cli"
             for m in importers), importers


def test_co_dino_model_and_criterion_are_independent():
  graph = _graph()
  model, crit = f"{PACKAGE}.co_dino.model", f"{PACKAGE}.co_dino.criterion"
  assert crit not in graph[model] and model not in graph[crit]


def test_trainer_names_no_method():
  source = (ROOT / PACKAGE / "train.py").read_text()
  assert "method ==" not in source and "semi" not in source and "co_dino" not in source
