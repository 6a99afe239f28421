"""The one-off comparison behind ``branch_free_forms.log``: on a GPU, the forms that launch
fewer kernels or wait on the host less, against the forms they replace, in one run.

- Lanczos with the vectors ravelled into one array (``curvature._ravels_basis``: a GPU, one
  device, several leaves of one dtype) against the per-leaf form, for each reorthogonalisation,
  twenty steps on the MLP of ``benchmarks/curvature.py`` (linearised products) against twenty
  chained products. Before the timing, the two forms' tridiagonals are compared.
- PGD reading the whole gradient for its test and drawing at every step (no ``lax.cond``,
  ``jaxsaddle._backend.branches_wait_on_host``) against its two conds, on the training step of
  ``benchmarks/perturbation.py``, against ``optax.sgd``.
- The monitor rows of ``benchmarks/spectrum.py``, whose estimating step runs the ravelled form.

A row "..., as before" is traced with the library's choice patched to the form it replaced.
Run from the repository root as ``PYTHONPATH=. python
benchmarks/results/h100/branch_free_forms.py 8`` (the argument is the number of rounds).
"""

import contextlib
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import optax

from benchmarks import _timing
from benchmarks import curvature
from benchmarks import perturbation
from benchmarks import spectrum
from benchmarks.results.h100 import loop_forms
from jaxsaddle import _backend
from jaxsaddle import curvature as jaxsaddle_curvature


def as_before(step, patches):
  """``step``, traced with each ``(module, name, value)`` of ``patches`` in place."""

  def traced(*args, **kwargs):
    with contextlib.ExitStack() as stack:
      for module, name, value in patches:
        stack.enter_context(mock.patch.object(module, name, value))
      return step(*args, **kwargs)

  return traced


PER_LEAF = [(jaxsaddle_curvature, "_ravels_basis", lambda _: False)]
WITH_CONDS = [(_backend, "branches_wait_on_host", lambda: False)]


def lanczos_rows(rounds: int) -> list[_timing.Timing]:
  settings, params, batch, tangent, _ = loop_forms.problem_and_rows(rounds)
  loops = {
    loop_forms.BASELINE: curvature.Loop(
      curvature.hvp_loop_step("linearized"), loop_forms.copy(tangent), params, batch
    )
  }
  state = (tangent, jnp.zeros((), jnp.int32))
  for reorthogonalize in curvature.REORTHOGONALIZATIONS:
    forms = {
      f"lanczos {reorthogonalize}": curvature.lanczos_step("linearized", reorthogonalize),
      f"lanczos {reorthogonalize}, as before (per leaf)": as_before(
        curvature.lanczos_step("linearized", reorthogonalize), PER_LEAF
      ),
    }
    ravelled, per_leaf = (jax.jit(form)(state, params, batch)[1] for form in forms.values())
    difference = jnp.max(jnp.abs(ravelled.alphas - per_leaf.alphas) / jnp.abs(per_leaf.alphas))
    print(
      f"reorthogonalize={reorthogonalize}: num_valid {int(ravelled.num_valid)} and "
      f"{int(per_leaf.num_valid)}; alphas differ by at most {float(difference):.2e} relative",
      flush=True,
    )
    for name, form in forms.items():
      loops[name] = curvature.DecompositionLoop(
        form, (loop_forms.copy(tangent), jnp.zeros((), jnp.int32)), params, batch
      )
  candidates = [_timing.Candidate(name, loop, loop_forms.BASELINE) for name, loop in loops.items()]
  return _timing.time_interleaved(candidates, settings)


def pgd_rows(rounds: int) -> list[_timing.Timing]:
  settings = _timing.Settings(rounds=rounds, min_sample_seconds=0.05, warmup_steps=3)

  def with_conds(make_tx):
    def make(key):
      tx = make_tx(key)
      return optax.GradientTransformationExtraArgs(tx.init, as_before(tx.update, WITH_CONDS))

    return make

  loops = {
    "optax.sgd": perturbation.single_run(perturbation.sgd),
    "pgd, test fails": perturbation.single_run(perturbation.pgd_test_fails),
    "pgd, test fails, as before (conds)": perturbation.single_run(
      with_conds(perturbation.pgd_test_fails)
    ),
    "pgd, perturbs every step (forced)": perturbation.single_run(
      perturbation.pgd_test_passes, force_perturbation=True
    ),
    "pgd, perturbs every step (forced), as before (conds)": perturbation.single_run(
      with_conds(perturbation.pgd_test_passes), force_perturbation=True
    ),
  }
  timings = _timing.time_interleaved(
    [_timing.Candidate(name, loop, "optax.sgd") for name, loop in loops.items()], settings
  )
  for name, loop in loops.items():
    if name != "optax.sgd":
      print(name, "perturbations:", int(optax.tree.get(loop.opt_state, "num_perturbations")))
  return timings


def main() -> None:
  rounds = int(sys.argv[1])
  print(jax.devices(), flush=True)
  print(_timing.markdown_table(lanczos_rows(rounds)), flush=True)
  print(_timing.markdown_table(pgd_rows(rounds)), flush=True)
  monitor_settings = _timing.Settings(rounds=rounds, min_sample_seconds=0.05, warmup_steps=3)
  print(_timing.markdown_table(spectrum.time_monitoring(monitor_settings)), flush=True)


if __name__ == "__main__":
  main()
