"""The installable library: a light top-level import, the public API's names and annotations,
pyproject's metadata, and (slow) a wheel installed into a fresh virtual environment that runs the
loss under jit and grad and the `sized-detr` command from outside the checkout."""
import email.parser
import inspect
import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

from packaging import requirements
import pytest

import sized_detr_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "tensorflow_datasets", "grain", "orbax", "pycocotools", "matplotlib",
         "torch")


def _loaded_after(code, cwd):
  """Top-level modules of HEAVY that `code` loads in a fresh interpreter."""
  probe = code + f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
  out = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True,
                       check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_probe_sees_a_heavy_import(tmp_path):
  """The probe itself: a module that pulls in matplotlib is reported."""
  assert _loaded_after("import matplotlib", tmp_path) == ["matplotlib"]


@pytest.mark.parametrize("code", [
    "import sized_detr_jax",
    "from sized_detr_jax import sized_l1_loss",
    "from sized_detr_jax import sized_l1_loss, l1_loss, giou_loss, generalized_box_iou, "
    "box_cxcywh_to_xyxy, hungarian_matching, matching_cost, dino_criterion, CriterionConfig",
    "from sized_detr_jax import losses",
])
def test_import_loads_no_heavy_framework(code, tmp_path):
  assert _loaded_after(code, tmp_path) == []


def _public_objects():
  return {name: getattr(sized_detr_jax, name) for name in sized_detr_jax.__all__
          if name != "__version__"}


def test_every_public_name_resolves_to_its_module():
  objects = _public_objects()
  assert {"sized_l1_loss", "l1_loss", "giou_loss", "generalized_box_iou", "box_cxcywh_to_xyxy",
          "box_xyxy_to_cxcywh", "hungarian_matching", "dino_criterion",
          "CriterionConfig", "Detector"} <= set(objects)
  for name, obj in objects.items():
    assert obj.__name__ == name and obj.__module__.startswith("sized_detr_jax."), name
  assert "sized_l1_loss" in dir(sized_detr_jax)
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    sized_detr_jax.nope  # pylint: disable=pointless-statement


def test_public_functions_are_annotated():
  for name, obj in _public_objects().items():
    if inspect.isclass(obj):
      continue
    sig = inspect.signature(obj)
    missing = [p for p, v in sig.parameters.items() if v.annotation is inspect.Parameter.empty]
    assert not missing, f"{name}: parameters without annotations {missing}"
    assert sig.return_annotation is not inspect.Signature.empty, f"{name}: no return annotation"


def _requirement_lines(path):
  lines = [l.split("#")[0].strip() for l in path.read_text().splitlines()]
  return [l for l in lines if l]


def test_pyproject_metadata():
  meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
  project = meta["project"]
  assert project["name"] == "sized-detr-jax"
  assert project["scripts"]["sized-detr"] == "sized_detr_jax.cli:entry"
  assert set(project["dynamic"]) == {"version", "dependencies"}
  assert meta["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
  assert {"gpu", "tpu", "tfds", "torch", "dev"} <= set(project["optional-dependencies"])
  # The CI interpreter satisfies requires-python (">=3.X").
  low = tuple(int(x) for x in project["requires-python"].removeprefix(">=").split("."))
  assert sys.version_info[:2] >= low
  # requirements-dev.txt installs the package with its dev extra, nothing else.
  assert _requirement_lines(ROOT / "requirements-dev.txt") == ["-e .[dev]"]
  for f in ("LICENSE", "NOTICE", "CITATION.cff", "CHANGELOG.md", "sized_detr_jax/py.typed"):
    assert (ROOT / f).is_file(), f
  assert "Apache License" in (ROOT / "LICENSE").read_text()
  assert f"version: {sized_detr_jax.__version__}" in (ROOT / "CITATION.cff").read_text()
  assert f"## {sized_detr_jax.__version__}" in (ROOT / "CHANGELOG.md").read_text()


# ---------------------------------------------------------------------------------------------
# The wheel in a fresh virtual environment (the dependencies come from this environment).
# ---------------------------------------------------------------------------------------------
_LOSS_CHECK = """
import jax, jax.numpy as jnp, numpy as np
import sized_detr_jax
from sized_detr_jax import sized_l1_loss
rng = np.random.default_rng(0)
t = np.concatenate([rng.uniform(0.2, 0.8, (6, 2)), rng.uniform(0.05, 0.4, (6, 2))], -1)
p = t + rng.normal(0, 0.02, t.shape)
valid = np.array([1, 1, 1, 1, 1, 0], bool)
f = jax.jit(jax.value_and_grad(lambda p: sized_l1_loss(p, jnp.asarray(t, jnp.float32), valid).sum()))
value, grad = f(jnp.asarray(p, jnp.float32))
want = ((np.abs(p - t)[:, [0, 2]].sum(1) / t[:, 2] + np.abs(p - t)[:, [1, 3]].sum(1) / t[:, 3])
        * valid).sum()
assert abs(float(value) - want) < 1e-4 * want, (float(value), want)
assert np.all(np.asarray(grad)[~valid] == 0)
print("FILE", sized_detr_jax.__file__)
print("OK", sized_detr_jax.__version__)
"""


def _build_wheel(source, out):
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(out), source], check=True, capture_output=True, text=True)
  wheels = list(out.glob("sized_detr_jax-*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0]


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory):
  """A fresh venv with the wheel of this checkout installed; the dependencies are visible from
  this environment's site-packages through a .pth file (nothing is downloaded)."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"  # a copy of what the wheel is built from (no build/ left in the checkout)
  for rel in ("pyproject.toml", "README.md", "LICENSE", "NOTICE", "requirements.txt"):
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).write_bytes((ROOT / rel).read_bytes())
  for path in (ROOT / "sized_detr_jax").rglob("*"):
    if path.is_file() and "__pycache__" not in path.parts:
      dest = src / path.relative_to(ROOT)
      dest.parent.mkdir(parents=True, exist_ok=True)
      dest.write_bytes(path.read_bytes())
  wheel = _build_wheel(str(src), tmp / "dist")
  venv = tmp / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  py = venv / "bin" / "python"
  site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
  pathlib.Path(site, "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                 check=True, capture_output=True, text=True)
  return {"wheel": wheel, "venv": venv, "python": py, "outside": tmp}


@pytest.mark.slow
def test_wheel_carries_configs_metadata_and_requirements(installed_venv):
  with zipfile.ZipFile(installed_venv["wheel"]) as zf:
    names = zf.namelist()
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = email.parser.Parser().parsestr(zf.read(meta_name).decode())
    entry_points = zf.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
  for name in ("synthetic", "dino_r50", "co_dino", "semi_detr", "coco_custom"):
    assert f"sized_detr_jax/configs/{name}.py" in names
  assert "sized_detr_jax/py.typed" in names
  assert not any(n.startswith(("tests/", "experiments/")) for n in names)
  assert meta["Name"] == "sized-detr-jax" and meta["Version"] == sized_detr_jax.__version__
  # Runtime requirements = requirements.txt (one source of truth).
  def normal(line):
    req = requirements.Requirement(line)
    return req.name.lower(), tuple(sorted(str(s) for s in req.specifier)), req.marker is None
  runtime = sorted(normal(r) for r in meta.get_all("Requires-Dist") if "extra ==" not in r)
  assert runtime == sorted(normal(r) for r in _requirement_lines(ROOT / "requirements.txt"))
  assert len(runtime) == 15
  assert "sized-detr = sized_detr_jax.cli:entry" in entry_points


@pytest.mark.slow
def test_installed_wheel_runs_the_loss_from_outside_the_checkout(installed_venv):
  out = subprocess.run([str(installed_venv["python"]), "-c", _LOSS_CHECK],
                       cwd=installed_venv["outside"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
  assert out.returncode == 0, out.stderr
  file_line = next(l for l in out.stdout.splitlines() if l.startswith("FILE "))
  assert file_line[5:].startswith(str(installed_venv["venv"])), file_line  # not the checkout
  assert f"OK {sized_detr_jax.__version__}" in out.stdout


@pytest.mark.slow
def test_installed_console_script_lists_configs(installed_venv):
  script = installed_venv["venv"] / "bin" / "sized-detr"
  out = subprocess.run([str(script), "--list-configs"], cwd=installed_venv["outside"],
                       capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
  assert out.returncode == 0, out.stderr
  for name in ("synthetic:", "dino_r50:", "co_dino:", "semi_detr:", "coco_custom:"):
    assert any(l.startswith(name) for l in out.stdout.splitlines()), name
  assert "sized_l1" in out.stdout and "plain" in out.stdout


@pytest.mark.slow
def test_wheel_builds_from_git(tmp_path):
  """The README's `pip install ... @ git+<url>`: pip clones the repository and builds it (here
  from a file:// URL of this checkout's committed HEAD)."""
  if not (ROOT / ".git").exists():
    pytest.skip("not a git checkout")
  wheel = _build_wheel(f"git+file://{ROOT}", tmp_path)
  with zipfile.ZipFile(wheel) as zf:
    assert "sized_detr_jax/losses.py" in zf.namelist()
