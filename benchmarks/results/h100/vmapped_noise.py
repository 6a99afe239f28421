"""The one-off comparison behind ``vmapped_noise.log``: where a vmapped PGD step's time goes
on a GPU.

Eight seeds of the training step of ``benchmarks/perturbation.py`` under ``jax.vmap``: SGD, the
noise transforms of optax and jaxsaddle, and PGD with its test failing, with and without the
escape check, and with an ``escape_steps`` it never reaches; then single runs of SGD, noisy_gd
and PGD. Under ``vmap`` PGD's conds are selects, so it draws at every step as the noise
transforms do. Run from the repository root as ``PYTHONPATH=. python
benchmarks/results/h100/vmapped_noise.py 6`` (the argument is the number of rounds).
"""

import sys

import optax

import jaxsaddle
from benchmarks import _timing
from benchmarks import perturbation


def pgd_without_escape_check(key):
  return jaxsaddle.pgd(
    perturbation.LEARNING_RATE,
    perturbation_radius=perturbation.NOISE_SCALE,
    gradient_threshold=1e-12,
    escape_steps=10,
    key=key,
  )


def pgd_never_ready(key):
  return jaxsaddle.pgd(
    perturbation.LEARNING_RATE,
    perturbation_radius=perturbation.NOISE_SCALE,
    gradient_threshold=1e30,
    escape_steps=10**6,
    key=key,
  )


def noisy_gd(key):
  return jaxsaddle.noisy_gd(
    perturbation.LEARNING_RATE, noise_scale=perturbation.NOISE_SCALE, key=key
  )


def main() -> None:
  settings = _timing.Settings(rounds=int(sys.argv[1]), min_sample_seconds=0.05, warmup_steps=3)
  vmapped = {
    "vmap8 optax.sgd": perturbation.sgd,
    "vmap8 optax.noisy_sgd": lambda key: optax.noisy_sgd(perturbation.LEARNING_RATE, key=key),
    "vmap8 noisy_gd": noisy_gd,
    "vmap8 pgd, test fails": perturbation.pgd_test_fails,
    "vmap8 pgd, test fails, no escape check": pgd_without_escape_check,
    "vmap8 pgd, never perturbs (escape_steps huge)": pgd_never_ready,
  }
  single = {
    "optax.sgd": perturbation.sgd,
    "noisy_gd": noisy_gd,
    "pgd, test fails": perturbation.pgd_test_fails,
  }
  candidates = [
    _timing.Candidate(name, perturbation.vmapped_runs(make_tx), "vmap8 optax.sgd")
    for name, make_tx in vmapped.items()
  ] + [
    _timing.Candidate(name, perturbation.single_run(make_tx), "optax.sgd")
    for name, make_tx in single.items()
  ]
  print(_timing.markdown_table(_timing.time_interleaved(candidates, settings)), flush=True)


if __name__ == "__main__":
  main()
