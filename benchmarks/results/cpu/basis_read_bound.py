"""What reading the Lanczos basis costs next to a Hessian-vector product on the benchmark MLP;
run from the repository root with PYTHONPATH=. ; its output is basis_read_bound.log.

Classical Gram-Schmidt against the filled rows reads each of them twice a step (``h = Q^T w``,
then ``w - Q h``), whatever the implementation; over K = 20 steps the filled rows number 9.5 on
average. Timing both reads of all 20 rows and one product of a chain of 20 bounds from below
what full reorthogonalisation can cost against the products.
"""

import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import _mlp
from benchmarks import curvature as bench

NUM_STEPS = bench.NUM_STEPS
params_key, batch_key, basis_key = jax.random.split(jax.random.key(0), 3)
params = _mlp.init_mlp(params_key)
batch = _mlp.random_batch(batch_key)
basis = jax.tree.map(
  lambda leaf: jax.random.normal(basis_key, (NUM_STEPS, *leaf.shape), leaf.dtype), params
)
vector = _mlp.normalized(params)


@jax.jit
def project(basis, vector):
  """``Q^T w``, one tensordot per leaf, as the library computes it."""
  per_leaf = jax.tree.map(
    lambda stacked, leaf: jnp.tensordot(stacked, leaf, axes=leaf.ndim, precision="highest"),
    basis,
    vector,
  )
  return sum(jax.tree.leaves(per_leaf))


@jax.jit
def subtract(basis, vector, coefficients):
  """``w - Q h`` over every row."""
  return jax.tree.map(
    lambda stacked, leaf: leaf - jnp.tensordot(coefficients, stacked, axes=1), basis, vector
  )


chain = jax.jit(bench.hvp_loop_step("plain"))
coefficients = project(basis, vector)
calls = {
  "Q^T w, 20 rows": lambda: project(basis, vector),
  "w - Q h, 20 rows": lambda: subtract(basis, vector, coefficients),
  "20 chained hvps": lambda: chain(vector, params, batch),
}
samples = {name: [] for name in calls}
for call in calls.values():
  jax.block_until_ready(call())
for _ in range(25):
  for name, call in calls.items():
    start = time.perf_counter()
    jax.block_until_ready(call())
    samples[name].append(time.perf_counter() - start)
median = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
basis_mb = sum(leaf.nbytes for leaf in jax.tree.leaves(basis)) / 1e6
print(f"{jax.devices()[0].platform}, 25 interleaved rounds, medians; basis {basis_mb:.1f} MB")
for name, ms in median.items():
  print(f"{name}: {ms:.3f} ms")
hvp = median["20 chained hvps"] / NUM_STEPS
both_reads = median["Q^T w, 20 rows"] + median["w - Q h, 20 rows"]
mean_filled = (NUM_STEPS - 1) / 2
print(f"one product of the chain: {hvp:.3f} ms")
print(f"both reads of all {NUM_STEPS} rows: {both_reads:.3f} ms ({both_reads / hvp:.2f} products)")
bound = 1 + mean_filled / NUM_STEPS * both_reads / hvp
print(f"full reorthogonalisation, reads alone, at least {bound:.2f}x the products")
