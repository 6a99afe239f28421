"""Command line: ``python -m experiments <name> [--seeds N] [--steps N] [--quick] [--out DIR]``.

Every experiment is a module with a ``Config`` dataclass that has ``seeds``,
``steps`` and ``fast_compile`` fields (see :mod:`experiments._runner`; quick
configs set ``fast_compile``), ``default_config(quick) -> Config``,
``check_config(config)`` (raises ValueError for a config the run would fail on; called
before the run directory is written, and again by ``run``) and
``run(run_dir: _runner.RunDirectory) -> str`` (computes what the run directory
lacks, writes figures and summary, returns the table to print; most hand their
parts to :func:`experiments._runner.run_experiment`). Register it in
``EXPERIMENTS``; modules are imported only when their experiment runs, so the
command line answers at once.

``--resume DIR`` continues a run that was interrupted: its config comes from
``DIR/config.json``, finished units are kept and only missing ones computed.
"""

import argparse
import dataclasses
import importlib
import sys
import time
from collections.abc import Sequence

# name -> (module, one-line description)
EXPERIMENTS = {
  "escape": (
    "experiments.escape",
    "GD, PGD, noisy GD and perturbed SGD started exactly at a saddle",
  ),
  "escape-toy": (
    "experiments.escape_toy",
    "escape time against dimension on quadratic saddles and the octopus, every method",
  ),
  "pgd-networks": (
    "experiments.pgd_networks",
    "PGD against GD across architectures and datasets, full- and mini-batch",
  ),
  "saddles-good-enough": (
    "experiments.saddles_good_enough",
    "the Hessian spectrum where GD, SGD, PGD and NC descent end: degenerate saddles?",
  ),
  "hessian-outliers": (
    "experiments.hessian_outliers",
    "Hessian outliers against classes, the gradient in their span, and BatchNorm, during GD",
  ),
  "curvature-search": (
    "experiments.curvature_search",
    "gradients and products a negative-curvature search needs on an MLP: Lanczos, Neon, Neon2",
  ),
  "scr-autoencoder": (
    "experiments.scr_autoencoder",
    "SCR against AdaGrad and SGD on a deep MNIST autoencoder's saddles (oracle calls, seconds)",
  ),
  "attraction-region": (
    "experiments.attraction",
    "attraction-region dimension vs n: GD, LSGD and mLSGD candidates",
  ),
}


def positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
  return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m experiments",
    description="Runs one experiment; python -m experiments <name> --help lists its options.",
  )
  subparsers = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
  for name, (_, description) in EXPERIMENTS.items():
    subparser = subparsers.add_parser(name, help=description, description=description)
    subparser.add_argument("--seeds", type=positive_int, help="number of seeds (vmapped)")
    subparser.add_argument("--steps", type=positive_int, help="optimizer steps per seed")
    subparser.add_argument("--quick", action="store_true", help="a CI-sized version")
    subparser.add_argument("--out", help="run directory (default: runs/<name>/<timestamp>)")
    subparser.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
  args = parser.parse_args(argv)
  if args.resume and (args.seeds or args.steps or args.quick or args.out):
    parser.error("--resume DIR reads its config from DIR/config.json; give no other option.")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  module = importlib.import_module(EXPERIMENTS[args.experiment][0])
  from experiments import _runner  # imports JAX, hence after the arguments are checked

  _runner.avoid_cpu_scheduler_hang()

  try:
    if args.resume:
      run_dir = _runner.RunDirectory.resume(args.resume, args.experiment, module.Config)
      module.check_config(run_dir.config)
    else:
      overrides = {name: getattr(args, name) for name in ("seeds", "steps")}
      config = dataclasses.replace(
        module.default_config(quick=args.quick),
        **{name: value for name, value in overrides.items() if value is not None},
      )
      # Before the run directory exists: a refused config must leave nothing to resume.
      module.check_config(config)
      run_dir = _runner.RunDirectory.create(args.experiment, config, args.out)
  except (FileExistsError, FileNotFoundError, NotADirectoryError, ValueError) as error:
    sys.exit(f"error: {error}")
  print(f"{args.experiment}: {run_dir.path}")
  start = time.perf_counter()
  try:
    table = module.run(run_dir)
  except KeyboardInterrupt:
    # Finished units are already on disk; JAX's traceback would hide how to continue.
    print(
      f"\ninterrupted: finished units are kept; continue with\n"
      f"  python -m experiments {args.experiment} --resume {run_dir.path}",
      file=sys.stderr,
    )
    return 130
  print(table)
  print(f"wrote {run_dir.path} in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
