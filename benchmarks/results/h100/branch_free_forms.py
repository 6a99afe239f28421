"""The one-off comparison behind ``branch_free_forms.log``: on a GPU, a Lanczos form that
launches fewer kernels against the one it replaced, in one run.

- Lanczos with the vectors ravelled into one array (``curvature._ravels_basis``: a GPU, one
  device, several leaves of one dtype) against the per-leaf form, for each reorthogonalisation,
  twenty steps on the MLP of ``benchmarks/curvature.py`` (linearised products) against twenty
  chained products. Before the timing, the two forms' tridiagonals are compared.
- The monitor rows of ``benchmarks/spectrum.py``, whose estimating step runs the ravelled form.

The log's PGD rows come from this script at commit 2264e3f, when PGD on a GPU read the whole
gradient for its test and drew at every step instead of taking its two ``lax.cond`` calls: it
timed that form against the conds on the training step of ``benchmarks/perturbation.py``. The
form measured no faster and was removed, and the rows with it.

A row "..., as before (per leaf)" is traced with the library's choice patched to the per-leaf
form.
Run from the repository root as ``PYTHONPATH=. python
benchmarks/results/h100/branch_free_forms.py 8`` (the argument is the number of rounds).
"""

import sys
from unittest import mock

import jax
import jax.numpy as jnp

from benchmarks import _timing
from benchmarks import curvature
from benchmarks import spectrum
from benchmarks.results.h100 import loop_forms
from jaxsaddle import curvature as jaxsaddle_curvature


def per_leaf(step):
  """``step``, traced with the library's choice patched to the per-leaf form."""

  def traced(*args):
    with mock.patch.object(jaxsaddle_curvature, "_ravels_basis", lambda _: False):
      return step(*args)

  return traced


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
      f"lanczos {reorthogonalize}, as before (per leaf)": per_leaf(
        curvature.lanczos_step("linearized", reorthogonalize)
      ),
    }
    ravelled, leafwise = (jax.jit(form)(state, params, batch)[1] for form in forms.values())
    difference = jnp.max(jnp.abs(ravelled.alphas - leafwise.alphas) / jnp.abs(leafwise.alphas))
    print(
      f"reorthogonalize={reorthogonalize}: num_valid {int(ravelled.num_valid)} and "
      f"{int(leafwise.num_valid)}; alphas differ by at most {float(difference):.2e} relative",
      flush=True,
    )
    for name, form in forms.items():
      loops[name] = curvature.DecompositionLoop(
        form, (loop_forms.copy(tangent), jnp.zeros((), jnp.int32)), params, batch
      )
  candidates = [_timing.Candidate(name, loop, loop_forms.BASELINE) for name, loop in loops.items()]
  return _timing.time_interleaved(candidates, settings)


def main() -> None:
  rounds = int(sys.argv[1])
  print(jax.devices(), flush=True)
  print(_timing.markdown_table(lanczos_rows(rounds)), flush=True)
  monitor_settings = _timing.Settings(rounds=rounds, min_sample_seconds=0.05, warmup_steps=3)
  print(_timing.markdown_table(spectrum.time_monitoring(monitor_settings)), flush=True)


if __name__ == "__main__":
  main()
