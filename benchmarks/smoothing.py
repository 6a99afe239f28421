"""Cost of Laplacian smoothing (LSGD) per training step, against optax.sgd, and of its solvers.

Run with ``python -m benchmarks.smoothing [--quick] [--json PATH]``.

The training step is the whole jitted step of a 784-512-512-10 ReLU MLP on a
fixed batch of 128 random inputs with softmax cross-entropy: ``value_and_grad``,
``tx.update`` and ``optax.apply_updates``, params and state donated. Every
smoothing row uses sigma = 1, order 1, the learning rate of the sgd row, and
differs from it only by the smoothing in front of it:

- ``complex fft per leaf``: the straightforward port of the reference code,
  ``ifft(fft(g) / (1 - sigma fft(stencil)))`` on each flattened leaf, the
  divisor computed in the graph;
- ``complex fft, global``: the same on the concatenation of all leaves (length
  669,706 = 2 x 103 x 3,251, an awkward FFT length);
- ``rfft``, ``direct``, ``recursive``: each of jaxsaddle's solvers forced on
  every leaf (``jaxsaddle.smoothing.smooth_last_axis(..., method=...)``);
- ``lsgd ...``: ``jaxsaddle.lsgd`` as users get it, which picks a solver per
  leaf; ``traced sigma`` is ``optax.inject_hyperparams(jaxsaddle.lsgd)``, where
  sigma is a traced array and only the FFT solver applies.

The second table times the solvers alone on one 784x512 leaf flattened
(n = 401,408) for several sigma and orders, the data behind
``jaxsaddle.smoothing.choose_method``. The "taps-equivalent" column divides a
solver's time by the time of one multiply-add per element of the direct solver
(its time over its number of taps, at the same sigma and order), the unit of
``choose_method``'s cost model.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsaddle
from benchmarks import _mlp
from benchmarks import _timing
from jaxsaddle import smoothing

LEARNING_RATE = 1e-2
SIGMA = 1.0
SOLVER_SHAPE = (784, 512)
SOLVER_CASES = [(0.05, 1), (1.0, 1), (10.0, 1), (1.0, 2), (10.0, 2)]


def training_loop(tx: optax.GradientTransformation) -> _mlp.TrainingLoop:
  params_key, batch_key = jax.random.split(jax.random.key(0))
  params = _mlp.init_mlp(params_key)
  step = _mlp.training_step(tx)
  return _mlp.TrainingLoop(step, params, tx.init(params), _mlp.random_batch(batch_key))


def complex_fft_smoothing(x: jax.Array, sigma: float) -> jax.Array:
  """The reference code's solve on a 1-D vector: divide by 1 - sigma fft([-2, 1, 0, ..., 1])."""
  stencil = jnp.zeros(x.size, x.dtype).at[jnp.array([0, 1, -1])].set(jnp.array([-2.0, 1.0, 1.0]))
  return jnp.real(jnp.fft.ifft(jnp.fft.fft(x) / (1 - sigma * jnp.fft.fft(stencil)))).astype(x.dtype)


def per_leaf(smooth) -> optax.GradientTransformation:
  """A stateless transform applying ``smooth`` to every flattened leaf of length >= 3."""

  def smooth_leaf(g):
    if g.size < smoothing.MIN_LENGTH:
      return g
    return smooth(g.reshape(-1)).reshape(g.shape)

  return optax.stateless(lambda updates, params: jax.tree.map(smooth_leaf, updates))


def global_complex_fft() -> optax.GradientTransformation:
  def smooth_all(updates, params):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    whole = complex_fft_smoothing(jnp.concatenate([g.reshape(-1) for g in leaves]), SIGMA)
    parts = jnp.split(whole, np.cumsum([g.size for g in leaves])[:-1])
    shaped = [p.reshape(g.shape) for p, g in zip(parts, leaves, strict=True)]
    return jax.tree.unflatten(treedef, shaped)

  return optax.stateless(smooth_all)


def forced_method(method: str) -> optax.GradientTransformation:
  return per_leaf(lambda x: smoothing.smooth_last_axis(x, SIGMA, 1, method))


def time_training_steps(settings: _timing.Settings) -> list[_timing.Timing]:
  sgd = optax.sgd(LEARNING_RATE)
  lsgd = lambda mode: jaxsaddle.lsgd(LEARNING_RATE, sigma=SIGMA, mode=mode)
  injected = optax.inject_hyperparams(jaxsaddle.lsgd, static_args=("order", "mode"))
  transforms = {
    "optax.sgd": sgd,
    "complex fft per leaf (reference code)": optax.chain(
      per_leaf(lambda x: complex_fft_smoothing(x, SIGMA)), sgd
    ),
    "complex fft, global": optax.chain(global_complex_fft(), sgd),
    "rfft per leaf, constant denominators": optax.chain(forced_method("fft"), sgd),
    "direct per leaf": optax.chain(forced_method("direct"), sgd),
    "recursive per leaf": optax.chain(forced_method("recursive"), sgd),
    "lsgd, leaf (automatic choice)": lsgd("leaf"),
    "lsgd, global": lsgd("global"),
    "lsgd, axis": lsgd("axis"),
    "lsgd, leaf, traced sigma (inject_hyperparams)": injected(LEARNING_RATE, sigma=SIGMA),
  }
  loops = {name: training_loop(tx) for name, tx in transforms.items()}
  timings = _timing.time_interleaved(
    [_timing.Candidate(name, loop) for name, loop in loops.items()], settings
  )
  for name, loop in loops.items():
    assert all(jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(loop.params)), name
  return timings


class SolverLoop:
  """A timing candidate: ``x = solve(x)`` on one flattened leaf, so each step waits for the last."""

  def __init__(self, solve):
    self._solve = jax.jit(solve)
    self.x = jax.random.normal(jax.random.key(1), (math.prod(SOLVER_SHAPE),))

  def __call__(self):
    self.x = self._solve(self.x)
    return self.x


def _solver_name(sigma: float, order: int, method: str) -> str:
  return f"sigma={sigma:g} order={order} {method}"


def time_solvers(settings: _timing.Settings) -> list[_timing.Timing]:
  candidates = []
  for sigma, order in SOLVER_CASES:
    methods = ["direct", "fft"] + (["recursive"] if order == 1 else [])
    for method in methods:
      solve = lambda x, s=sigma, p=order, m=method: smoothing.smooth_last_axis(x, s, p, m)
      name = _solver_name(sigma, order, method)
      baseline = _solver_name(sigma, order, "direct")
      candidates.append(_timing.Candidate(name, SolverLoop(solve), baseline))
  return _timing.time_interleaved(candidates, settings)


def solver_summary(timings: list[_timing.Timing]) -> list[dict]:
  """Per (sigma, order): each solver's time, in taps of the direct solver, and the choice."""
  n = math.prod(SOLVER_SHAPE)
  by_name = {timing.name: timing for timing in timings}
  rows = []
  for sigma, order in SOLVER_CASES:
    direct = by_name[_solver_name(sigma, order, "direct")]
    num_taps = len(
      smoothing._direct_offsets(
        n, smoothing._kernel_radius(sigma, order, smoothing._tolerance(jnp.float32))
      )
    )
    per_tap = direct.median / num_taps
    methods = ["direct", "fft"] + (["recursive"] if order == 1 else [])
    times = {m: by_name[_solver_name(sigma, order, m)].median for m in methods}
    rows.append(
      {
        "sigma": sigma,
        "order": order,
        "direct_taps": num_taps,
        "ms": {m: t * 1e3 for m, t in times.items()},
        "taps_equivalent": {m: t / per_tap for m, t in times.items()},
        "fastest": min(times, key=times.get),
        "chosen": smoothing.choose_method(n, sigma, order, jnp.float32),
      }
    )
  return rows


def main() -> None:
  args = _timing.argument_parser(__doc__.splitlines()[0]).parse_args()
  settings = _timing.settings_from(args)
  step_timings = time_training_steps(settings)
  solver_timings = time_solvers(settings)
  summary = solver_summary(solver_timings)

  print(
    f"Training step of {_mlp.description()}, sigma {SIGMA:g}, order 1, params and state donated; "
    f"{settings.rounds} interleaved rounds, medians over rounds; {jax.default_backend()}, "
    f"{jax.device_count()} device(s), load average {os.getloadavg()[0]:.1f}; allocator: "
    f"{_timing.allocator()}.\n"
  )
  print(_timing.markdown_table(step_timings))
  print(f"\nSolvers alone on one flattened {SOLVER_SHAPE[0]}x{SOLVER_SHAPE[1]} leaf, float32:\n")
  print(_timing.markdown_table(solver_timings))
  print(
    "\n| sigma | order | direct taps | ms (direct / fft / recursive) | taps-equivalent "
    "(direct / fft / recursive) | fastest | chosen |"
  )
  print("|---:|---:|---:|---|---|---|---|")
  for row in summary:
    ms = " / ".join(f"{v:.3f}" for v in row["ms"].values())
    taps = " / ".join(f"{v:.0f}" for v in row["taps_equivalent"].values())
    print(
      f"| {row['sigma']:g} | {row['order']} | {row['direct_taps']} | {ms} | {taps} "
      f"| {row['fastest']} | {row['chosen']} |"
    )

  if args.json:
    _timing.write_json(
      args.json,
      {
        "benchmark": "smoothing",
        "environment": _timing.environment(),
        "settings": dataclasses.asdict(settings),
        "training_step": _timing.as_json(step_timings),
        "solvers": _timing.as_json(solver_timings),
        "solver_summary": summary,
      },
    )


if __name__ == "__main__":
  main()
