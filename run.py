"""Train, evaluate, predict with or summarise a detector: `python run.py --config=NAME[:TOKENS]`.

The same command as the installed `sized-detr` script (sized_detr_jax/cli.py holds it);
`python run.py --help` lists the flags, `python run.py --list-configs` the configs.
"""
from sized_detr_jax import cli

if __name__ == "__main__":
  cli.entry()
