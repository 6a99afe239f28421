"""hessian_density with probes vmapped (probe_batch_size=None) and one at a time (1), timed;
run from the repository root with PYTHONPATH=. ; its output is slq_probe_batching.log."""

import functools
import time

import jax
import numpy as np

from benchmarks import _mlp
from jaxsaddle import spectrum

params_key, batch_key = jax.random.split(jax.random.key(0))
params = _mlp.init_mlp(params_key)
batch = _mlp.random_batch(batch_key)


def density(params, reorthogonalize, probe_batch_size):
  value_fn = functools.partial(_mlp.loss_fn, batch=batch)
  return spectrum.hessian_density(
    value_fn,
    params,
    key=0,
    num_probes=4,
    num_steps=20,
    reorthogonalize=reorthogonalize,
    probe_batch_size=probe_batch_size,
  ).density


for reorthogonalize in (True, False):
  for probe_batch_size in (None, 1):
    run = jax.jit(
      functools.partial(density, reorthogonalize=reorthogonalize, probe_batch_size=probe_batch_size)
    )
    jax.block_until_ready(run(params))
    seconds = []
    for _ in range(5):
      start = time.perf_counter()
      jax.block_until_ready(run(params))
      seconds.append(time.perf_counter() - start)
    print(
      f"reorth {reorthogonalize} batch {probe_batch_size} {round(np.median(seconds) * 1e3, 1)} ms",
      flush=True,
    )
