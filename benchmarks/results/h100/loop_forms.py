"""The one-off comparison behind ``loop_forms*.log``: Lanczos looped or unrolled on a GPU.

Twenty Lanczos steps on the MLP of ``benchmarks/curvature.py`` with each reorthogonalisation,
``unroll=False`` and ``unroll=True``, against twenty chained products, then the
monitor_curvature rows of ``benchmarks/spectrum.py``; interleaved as every benchmark is. Run
from the repository root as ``PYTHONPATH=. python benchmarks/results/h100/loop_forms.py 12``
(the argument is the number of rounds), once as is and once with
``XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL``.
"""

import sys

import jax
import jax.numpy as jnp

from benchmarks import _mlp
from benchmarks import _timing
from benchmarks import curvature
from benchmarks import spectrum

BASELINE = "20 hvps fori"


def problem_and_rows(rounds: int):
  """The settings, the MLP's params, batch and start tangent, and the rows both comparisons here
  share: twenty chained products (looped, the baseline, and unrolled) and ``jaxsaddle.lanczos``
  with each reorthogonalisation, looped and unrolled."""
  settings = _timing.Settings(rounds=rounds, min_sample_seconds=0.05, warmup_steps=3)
  params_key, batch_key, tangent_key = jax.random.split(jax.random.key(0), 3)
  params = _mlp.init_mlp(params_key)
  batch = _mlp.random_batch(batch_key)
  tangent = _mlp.normalized(_mlp.init_mlp(tangent_key))
  loops = {
    BASELINE: curvature.Loop(curvature.hvp_loop_step("linearized"), copy(tangent), params, batch),
    "20 hvps unrolled": curvature.Loop(
      curvature.hvp_loop_step("linearized", unroll=True), copy(tangent), params, batch
    ),
  }
  for reorthogonalize in curvature.REORTHOGONALIZATIONS:
    for unroll in (False, True):
      loops[f"lanczos {reorthogonalize} unroll={unroll}"] = curvature.DecompositionLoop(
        curvature.lanczos_step("linearized", reorthogonalize, unroll=unroll),
        (copy(tangent), jnp.zeros((), jnp.int32)),
        params,
        batch,
      )
  return settings, params, batch, tangent, loops


def copy(tree):
  """A copy of ``tree``: each row donates its own buffers."""
  return jax.tree.map(jnp.copy, tree)


def main() -> None:
  settings, *_, loops = problem_and_rows(int(sys.argv[1]))
  candidates = [_timing.Candidate(name, loop, BASELINE) for name, loop in loops.items()]
  print(_timing.markdown_table(_timing.time_interleaved(candidates, settings)), flush=True)
  print(_timing.markdown_table(spectrum.time_monitoring(settings)), flush=True)


if __name__ == "__main__":
  main()
