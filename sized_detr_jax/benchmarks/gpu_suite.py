r"""The GPU measurements in one go (one H100, within --budget_s, default 8 minutes).

  python -m sized_detr_jax.benchmarks.gpu_suite --out=DIR --dino_src=DINO_CHECKOUT
  python -m sized_detr_jax.benchmarks.gpu_suite --out=DIR --dry_run    # each part tiny, on CPU

Parts, each one subprocess of an existing benchmark (their docstrings say what they measure):
  kernel_tests       tests/test_models_msda_pallas.py on the GPU (the Pallas MSDA kernel lowered
                     through Triton, against the float64 reference and the gather version);
  msda               benchmarks.msda: gather vs Pallas at 800x1333, batch 8, f32 and bf16;
  train_step_*       benchmarks.train_step on dino_r50 at 800x1333, batch 8: tokens coco91,
                     coco91,bf16, coco91,pallas, coco91,bf16,pallas;
  matching_host      benchmarks.matching --host_table (the host Hungarian solve per step);
  vs_pytorch         benchmarks.vs_pytorch --device=gpu against the official DINO in --dino_src
                     (skipped without it); its output says which MSDA PyTorch ran (DINO's CUDA op,
                     or its pure-PyTorch `ms_deform_attn_core_pytorch` when the op is not built);
  scale              (opt-in: only with --parts naming it; its compiles do not fit the budget)
                     benchmarks.scale: FLOPs per image of the paper rows' train steps and the
                     device's memory analysis of DINO's step at batch 2 / 4 / 8, with and
                     without remat (docs/scale.md, whose memory table is a CPU's until this runs).
Each part gets at most its own time slice and what is left of the budget; a part that fails or
runs out of time is recorded as such and the suite goes on. Written to --out: gpu_suite.json
(every part's command, status, seconds and output tail) and gpu_suite.md (one table, with each
part's key lines). `--dry_run` runs the same parts at tiny sizes on the CPU (the Pallas kernel
in interpret mode, the JAX half of vs_pytorch), to check the suite itself.
"""
import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FULL_SIZE, FULL_BATCH = "800x1333", 8
TRAIN_TOKENS = ("coco91", "coco91,bf16", "coco91,pallas", "coco91,bf16,pallas")
# Lines of a part's output that go into the markdown table.
KEY_LINES = re.compile(r"(passed|failed|error|step_s|img_per_s|compile_s|memory:|flops:|"
                       r"Q=\d+|max \||valid GT|  +\d+ +(full|pruned) |GIL|MSDA|ratio|median|"
                       r"^(eval|train) +(jax|pytorch) |skipped)", re.IGNORECASE)


@dataclasses.dataclass
class Part:
  """One subprocess of the suite."""
  name: str
  argv: list
  slice_s: float                  # its own time limit
  env: dict = dataclasses.field(default_factory=dict)
  skip: str = ""                  # non-empty: not run, and why


def _module(name, *args):
  return [sys.executable, "-m", f"sized_detr_jax.benchmarks.{name}", *args]


# A dry-run part's time limit: tiny sizes, but every part compiles a model on a CPU that may be
# busy (a CI runner); --budget_s still bounds the whole run.
DRY_SLICE_S = 300.0


def plan(dry_run: bool, dino_src: str = "") -> list:
  """The suite's parts: full size on the GPU, or tiny on the CPU with `dry_run`."""
  platform_env = {"JAX_PLATFORMS": "cpu" if dry_run else "cuda,cpu"}
  parts = [Part("kernel_tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 os.path.join(ROOT, "tests", "test_models_msda_pallas.py")],
                DRY_SLICE_S if dry_run else 60, dict(platform_env))]
  if dry_run:
    parts.append(Part("msda", _module("msda", "--height=64", "--width=64", "--batch=1",
                                      "--reps=1"), DRY_SLICE_S, dict(platform_env)))
  else:
    for dtype in ("float32", "bfloat16"):
      parts.append(Part(f"msda_{dtype}", _module("msda", f"--batch={FULL_BATCH}",
                                                 f"--dtype={dtype}", "--reps=10"),
                        30, dict(platform_env)))
  for tokens in TRAIN_TOKENS:
    if dry_run:
      argv = _module("train_step", "--config=dino_r50", f"--config_arg=smoke,{tokens}",
                     "--size=64x64", "--batch=1", "--steps=1")
    else:
      argv = _module("train_step", "--config=dino_r50", f"--config_arg={tokens}",
                     f"--size={FULL_SIZE}", f"--batch={FULL_BATCH}", "--steps=5")
    if dry_run and "pallas" in tokens:
      # The Pallas kernel in interpret mode runs far slower than XLA on a CPU: the dry run
      # checks that the option is accepted and compiles, not its speed.
      argv.append("--compile_only")
    parts.append(Part("train_step_" + tokens.replace(",", "_"), argv,
                      DRY_SLICE_S if dry_run else 55, dict(platform_env)))
  table = (["--layers=1", "--batch=2", "--queries=128", "--reps=1"] if dry_run else ["--reps=10"])
  parts.append(Part("matching_host", _module("matching", "--host_table", *table),
                    DRY_SLICE_S if dry_run else 40,
                    {"JAX_PLATFORMS": "cpu"}))
  if dry_run:
    parts.append(Part("vs_pytorch", _module("vs_pytorch", "--jax_only", "--config_arg=tiny",
                                            "--sizes=96x96,80x96", "--reps=1", "--modes=eval"),
                      DRY_SLICE_S, dict(platform_env)))
  else:
    skip = "" if dino_src else "no --dino_src (a checkout of IDEA-Research/DINO) given"
    parts.append(Part("vs_pytorch", _module("vs_pytorch", f"--dino_src={dino_src}",
                                            "--device=gpu", f"--batch={FULL_BATCH}",
                                            f"--sizes={FULL_SIZE},800x1200", "--reps=3"),
                      100, dict(platform_env), skip=skip))
  scale = (["--dry_run", "--rows=dino", "--memory_batches=1"] if dry_run else
           ["--memory_batches=2,4,8"])
  parts.append(Part("scale", _module("scale", *scale), DRY_SLICE_S if dry_run else 600,
                    dict(platform_env), skip=OPT_IN))
  return parts


# The skip reason of parts that run only when --parts names them.
OPT_IN = "opt-in: name it in --parts"


def run_part(part: Part, budget_left_s: float, tail_lines: int = 60) -> dict:
  """Runs one part within min(its slice, the budget left); its record for the JSON."""
  record = {"name": part.name, "command": " ".join(part.argv), "env": part.env,
            "status": "skipped", "wall_s": 0.0, "returncode": None, "output_tail": []}
  if part.skip:
    record["reason"] = part.skip
    return record
  limit = min(part.slice_s, budget_left_s)
  if limit < 5:
    record["reason"] = f"the suite's budget is spent ({budget_left_s:.0f} s left)"
    return record
  start = time.perf_counter()
  try:
    out = subprocess.run(part.argv, env={**os.environ, **part.env}, cwd=ROOT,
                         capture_output=True, text=True, timeout=limit, check=False)
    text, record["returncode"] = out.stdout + out.stderr, out.returncode
    record["status"] = "ok" if out.returncode == 0 else "failed"
  except subprocess.TimeoutExpired as e:
    text = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
            else (e.stdout or "")) + ((e.stderr or b"").decode(errors="replace")
                                      if isinstance(e.stderr, bytes) else (e.stderr or ""))
    record["status"] = f"timeout after {limit:.0f} s"
  record["wall_s"] = round(time.perf_counter() - start, 1)
  record["output_tail"] = text.splitlines()[-tail_lines:]
  return record


def key_lines(record: dict, limit: int = 10) -> list:
  """The lines of a part's output that the table shows (figures, pass/fail counts)."""
  if record["status"] == "skipped":
    return [record.get("reason", "")]
  lines = [l.strip() for l in record["output_tail"] if KEY_LINES.search(l)]
  if record["status"] != "ok" and record["output_tail"]:
    lines.append(record["output_tail"][-1].strip())
  return lines[-limit:]


def markdown(records: list, header: dict) -> str:
  """One table: part, status, seconds, key lines."""
  rows = [f"GPU suite ({'dry run, CPU' if header['dry_run'] else 'GPU'}), {header['date']}, "
          f"{header['host']}, budget {header['budget_s']:.0f} s, total {header['total_s']:.0f} s",
          "", "| part | status | s | key lines |", "|---|---|---|---|"]
  for r in records:
    lines = "<br>".join(l.replace("|", "\\|") for l in key_lines(r))
    rows.append(f"| {r['name']} | {r['status']} | {r['wall_s']:.0f} | {lines} |")
  return "\n".join(rows) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder for gpu_suite.json / gpu_suite.md")
  parser.add_argument("--dry_run", action="store_true", help="every part tiny, on the CPU")
  parser.add_argument("--dino_src", default="", help="checkout of IDEA-Research/DINO")
  parser.add_argument("--budget_s", type=float, default=480.0)
  parser.add_argument("--parts", default="", help="comma-separated part names (default: all)")
  args = parser.parse_args(argv)
  parts = plan(args.dry_run, args.dino_src)
  if args.parts:
    wanted = args.parts.split(",")
    unknown = sorted(set(wanted) - {p.name for p in parts})
    if unknown:
      parser.error(f"--parts: unknown {unknown}; known: {[p.name for p in parts]}")
    parts = [dataclasses.replace(p, skip="") if p.skip == OPT_IN else p
             for p in parts if p.name in wanted]
  os.makedirs(args.out, exist_ok=True)
  start, records = time.perf_counter(), []
  for part in parts:
    record = run_part(part, args.budget_s - (time.perf_counter() - start))
    records.append(record)
    print(f"{part.name}: {record['status']} ({record['wall_s']:.0f} s)", flush=True)
  header = {"dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M"),
            "host": f"{platform.node()} ({os.cpu_count()} CPUs, load "
                    f"{os.getloadavg()[0]:.1f})", "budget_s": args.budget_s,
            "total_s": time.perf_counter() - start}
  with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:
    json.dump({**header, "parts": records}, f, indent=1)
  table = markdown(records, header)
  with open(os.path.join(args.out, "gpu_suite.md"), "w") as f:
    f.write(table)
  print(table)
  return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
  sys.exit(main())
