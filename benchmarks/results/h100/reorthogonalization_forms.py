"""The one-off comparison behind ``reorthogonalization_forms.log``: where a GPU Lanczos step's
time goes with full reorthogonalisation.

Twenty Lanczos steps on the MLP of ``benchmarks/curvature.py`` (linearised products), written
several ways, against twenty chained products: the basis stored per leaf (``tree``) or as one
ravelled matrix (``flat``); the steps in a ``fori_loop`` reading every basis row (unfilled rows
are zero) or unrolled in Python reading only the filled rows (static slices); one Gram-Schmidt
pass, two, or a second only when Kahan's test asks (a ``lax.cond``). On a GPU a ``lax.cond``
or a loop iteration waits for its predicate on the host, so the forms differ in how many times a
step stops the device as well as in the memory they read. ``jaxsaddle.lanczos`` with each
reorthogonalisation, looped and unrolled, is timed beside them.

``reorthogonalization_forms_before.log`` is a run with the library before its GPU form and a
longer list of sketches (tree and flat, looped and unrolled, each number of passes);
``reorthogonalization_forms.log`` is this script, after (its library rows were then named
``jaxsaddle.lanczos ...``; the rows it shares with ``loop_forms.py`` now come from there). Run
from the repository root as ``PYTHONPATH=. python
benchmarks/results/h100/reorthogonalization_forms.py 10`` (the argument is the number of
rounds).
"""

import sys

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from benchmarks import _timing
from benchmarks import curvature
from benchmarks.results.h100 import loop_forms

NUM_STEPS = curvature.NUM_STEPS
HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a, b):
  return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _coefficients(basis, w):
  return sum(
    jnp.tensordot(stacked, leaf, axes=leaf.ndim, precision=HIGHEST)
    for stacked, leaf in zip(jax.tree.leaves(basis), jax.tree.leaves(w), strict=True)
  )


def _subtract(basis, h, w):
  return jax.tree.map(
    lambda stacked, leaf: leaf - jnp.tensordot(h, stacked, 1, precision=HIGHEST), basis, w
  )


def sketch_lanczos(matvec, start, layout: str, loop: str, passes: str):
  """Full-reorthogonalisation Lanczos without the library's guards: the forms' bare cost."""
  if layout == "flat":
    flat_start, unravel = ravel_pytree(start)
    operator = lambda v: ravel_pytree(matvec(unravel(v)))[0]
    start = flat_start
  else:
    operator = matvec
  start = jax.tree.map(lambda leaf: leaf / jnp.sqrt(_dot(start, start)), start)
  basis = jax.tree.map(
    lambda leaf: jnp.zeros((NUM_STEPS, *leaf.shape), leaf.dtype).at[0].set(leaf), start
  )

  def rows(basis, j):
    if loop == "unrolled":
      return jax.tree.map(lambda stacked: stacked[: j + 1], basis)
    return basis

  def one_pass(basis_rows, w):
    h = _coefficients(basis_rows, w)
    return _subtract(basis_rows, h, w), h

  def step(j, carry):
    basis, alphas, betas, q, q_prev, beta_prev = carry
    w = operator(q)
    alpha = _dot(q, w)
    w = jax.tree.map(lambda a, b, c: a - alpha * b - beta_prev * c, w, q, q_prev)
    if passes != "none":
      basis_rows = rows(basis, j)
      w, h = one_pass(basis_rows, w)
      if passes == "two":
        w, _ = one_pass(basis_rows, w)
      elif passes == "kahan":
        beta_once = jnp.sqrt(_dot(w, w))
        w = jax.lax.cond(
          jnp.sum(h * h) > beta_once * beta_once,
          lambda w: one_pass(basis_rows, w)[0],
          lambda w: w,
          w,
        )
    beta = jnp.sqrt(_dot(w, w))
    q_next = jax.tree.map(lambda leaf: leaf / beta, w)
    basis = jax.tree.map(
      lambda stacked, leaf: stacked.at[j + 1].set(leaf, mode="drop"), basis, q_next
    )
    return basis, alphas.at[j].set(alpha), betas.at[j].set(beta), q_next, q, beta

  zeros = jnp.zeros(NUM_STEPS)
  carry = (basis, zeros, zeros, start, jax.tree.map(jnp.zeros_like, start), jnp.zeros(()))
  if loop == "unrolled":
    for j in range(NUM_STEPS):
      carry = step(j, carry)
  else:
    carry = jax.lax.fori_loop(0, NUM_STEPS, step, carry)
  basis, alphas, betas, last, _, _ = carry
  if layout == "flat":
    last = unravel(last)
  return last, (basis, alphas, betas)


def sketch_step(layout: str, loop: str, passes: str):
  def step(start, params, batch):
    operator = curvature.hessian_operator(params, batch, "linearized")
    return sketch_lanczos(operator, start, layout, loop, passes)

  return step


def main() -> None:
  settings, params, batch, tangent, loops = loop_forms.problem_and_rows(int(sys.argv[1]))
  forms = [
    ("tree", "unrolled", "two"),
    ("tree", "unrolled", "none"),
    ("flat", "unrolled", "two"),
    ("flat", "unrolled", "none"),
  ]
  for layout, loop, passes in forms:
    loops[f"sketch {layout} {loop} passes={passes}"] = curvature.DecompositionLoop(
      sketch_step(layout, loop, passes), loop_forms.copy(tangent), params, batch
    )
  candidates = [_timing.Candidate(name, loop, loop_forms.BASELINE) for name, loop in loops.items()]
  print(jax.devices(), flush=True)
  print(_timing.markdown_table(_timing.time_interleaved(candidates, settings)), flush=True)


if __name__ == "__main__":
  main()
