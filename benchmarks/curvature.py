"""Cost of Hessian-vector products and of Lanczos on the MLP, against a gradient.

Run with ``python -m benchmarks.curvature [--quick] [--json PATH]``.

The operator is the Hessian of the training loss of a 784-512-512-10 ReLU MLP on
a fixed batch of 128 random inputs with softmax cross-entropy, at fixed params.
Every row is one jitted call whose output feeds the next call (see
``benchmarks/_timing.py``), with that threaded input donated:

- ``gradient``: ``params - lr * jax.grad(loss_fn)(params, batch)``, the baseline
  (an SGD step; the update keeps each call dependent on the last);
- ``hvp``: ``v = H v / ||H v||`` with ``jaxsaddle.hvp``, forward-over-reverse;
- ``K hvps, ...``: the same ``K`` times in a ``lax.fori_loop`` inside one call,
  each product fed the previous one (normalised), with ``jaxsaddle.hvp`` at
  every step (``plain``) or with the operator from ``jaxsaddle.linearize_hvp``
  built once before the loop (``linearized``); the cost Lanczos cannot go below;
- ``lanczos, ...``: ``jaxsaddle.lanczos(matvec, v0, K)`` with full
  (``reorthogonalize=True``), partial (``"partial"``, Simon's estimates decide when to
  reorthogonalise) or no reorthogonalisation, and either matvec; the next call starts from the last
  Lanczos vector of this one. Its ratio is to the ``K hvps`` row with the same
  matvec, so it is the overhead of the recursion (inner products, the basis, the
  reorthogonalisation) over the products themselves;
- ``matfree, ...``: the same for matfree's Lanczos tridiagonalisation,
  ``matfree.decomp.tridiag_sym(K, reortho=...)`` with ``reortho="full"`` (two
  Gram-Schmidt passes against the whole basis every step) or ``"none"``.
  matfree works on flat vectors: the operator it gets is the same matvec
  wrapped in ``jax.flatten_util.ravel_pytree`` (unravel the vector, apply,
  ravel the product), and its start vector is the ravelled one;
- ``neon search`` and ``neon2 search``: an SGD step whose update is that of
  ``jaxsaddle.neon`` or ``jaxsaddle.neon2`` with ``K`` search steps, set to
  search at every call (a huge ``gradient_threshold``): the step's gradient plus
  a search, which the experiments count as ``K + 3`` gradients
  (``experiments._oracle.curvature_call_cost``); its ratio to the ``gradient``
  row checks that count.

Every Lanczos row returns its whole decomposition (basis and coefficients) as
an output of the jitted call, as a caller that uses the Ritz vectors would, so
XLA cannot skip writing the basis. After the timing, every Lanczos row of
jaxsaddle is checked to have run all ``K`` steps (no breakdown, which would turn
later products into products with zero) and every threaded output to be finite.

A second table does the same on a small conv net (``benchmarks/_conv.py``) with
``K = 10``, where XLA on the CPU runs the products many times slower inside a
loop body (jax-ml/jax#12868): ten chained linearised products in a
``fori_loop`` and unrolled in Python, and ``jaxsaddle.lanczos`` with full
reorthogonalisation by default (which unrolls on the CPU when the operator
convolves) and forced into its loop (``unroll=False``), all as ratios to the
unrolled products.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import matfree.decomp
from jax.flatten_util import ravel_pytree

import jaxsaddle
from benchmarks import _conv
from benchmarks import _mlp
from benchmarks import _timing

NUM_STEPS = 20  # K: Lanczos steps, and products in the loop rows
LEARNING_RATE = 1e-2
MATVECS = ("plain", "linearized")
SEARCHES = ("neon", "neon2")
MATFREE_REORTHO = ("full", "none")
REORTHOGONALIZATIONS = (True, "partial", False)


def hessian_operator(params, batch, matvec: str, loss_fn=_mlp.loss_fn):
  """``v -> H v`` at ``params``; ``linearized`` runs the forward pass once, here."""
  value_fn = lambda p: loss_fn(p, batch)
  if matvec == "plain":
    return lambda tangent: jaxsaddle.hvp(value_fn, params, tangent)
  _, operator = jaxsaddle.linearize_hvp(value_fn, params)
  return operator


class Loop:
  """A timing candidate's step: ``state = step(state, params, batch)``, jitted, state donated.

  ``state`` is whatever the next call needs from this one: params for the
  gradient and search rows, the tangent for the others.
  """

  def __init__(self, step, state, params, batch):
    self._step = jax.jit(step, donate_argnums=0)
    self.state = state
    self._params = params
    self._batch = batch

  def __call__(self):
    self.state = self._step(self.state, self._params, self._batch)
    return self.state


class DecompositionLoop(Loop):
  """A Loop whose step returns ``(state, decomposition)``; only the state is threaded.

  The decomposition is a real output of every call, so its basis is computed in full; the
  previous one is dropped before the next call, as a caller that used it would have.
  """

  decomposition = None

  def __call__(self):
    self.decomposition = None
    self.state, self.decomposition = self._step(self.state, self._params, self._batch)
    return self.state


def gradient_step(params, unused_params, batch):
  del unused_params
  grads = jax.grad(_mlp.loss_fn)(params, batch)
  return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)


def hvp_step(tangent, params, batch):
  return _mlp.normalized(hessian_operator(params, batch, "plain")(tangent))


def hvp_loop_step(
  matvec: str, num_steps: int = NUM_STEPS, loss_fn=_mlp.loss_fn, unroll: bool = False
):
  def step(tangent, params, batch):
    operator = hessian_operator(params, batch, matvec, loss_fn)
    return jaxsaddle.curvature.fori_loop(
      num_steps, lambda _, v: _mlp.normalized(operator(v)), _mlp.normalized(tangent), unroll=unroll
    )

  return step


def lanczos_step(
  matvec: str,
  reorthogonalize,
  num_steps: int = NUM_STEPS,
  loss_fn=_mlp.loss_fn,
  unroll: bool | None = None,
):
  """``((start, num_valid), params, batch) -> ((last vector, num_valid), LanczosResult)``."""

  def step(state, params, batch):
    start, _ = state
    operator = hessian_operator(params, batch, matvec, loss_fn)
    result = jaxsaddle.lanczos(
      operator, start, num_steps, reorthogonalize=reorthogonalize, unroll=unroll
    )
    return (jax.tree.map(lambda stacked: stacked[-1], result.basis), result.num_valid), result

  return step


def matfree_step(matvec: str, reortho: str):
  """``(start, params, batch) -> (last vector, matfree's decomposition)``, on ravelled vectors."""
  tridiagonalize = matfree.decomp.tridiag_sym(NUM_STEPS, reortho=reortho)

  def step(start, params, batch):
    operator = hessian_operator(params, batch, matvec)
    flat_start, unravel = ravel_pytree(start)
    decomposition = tridiagonalize(lambda v: ravel_pytree(operator(unravel(v)))[0], flat_start)
    return unravel(decomposition.Q_tall[-1]), decomposition

  return step


def search_step(method: str):
  """``(params, params, batch) -> params + update`` of a ``method`` transform that searches."""
  tx = getattr(jaxsaddle, method)(
    LEARNING_RATE,
    hessian_lipschitz=1e6,  # a short curvature step, so that the params stay near the start
    epsilon=1e-30,
    smoothness=1.0,  # sets the search's polynomial, not its cost
    num_search_steps=NUM_STEPS,
    gradient_threshold=1e30,
  )

  def step(params, unused_params, batch):
    del unused_params
    value_fn = lambda p: _mlp.loss_fn(p, batch)  # noqa: E731
    updates, _ = tx.update(jax.grad(value_fn)(params), tx.init(params), params, value_fn=value_fn)
    return jax.tree.map(jnp.add, params, updates)

  return step


def _search_name(method: str) -> str:
  return f"{method} search {NUM_STEPS}"


def _loop_name(matvec: str) -> str:
  return f"{NUM_STEPS} hvps, {matvec}"


def _lanczos_name(matvec: str, reorthogonalize) -> str:
  return f"lanczos {NUM_STEPS}, {matvec}, reorthogonalize={reorthogonalize}"


def _matfree_name(matvec: str, reortho: str) -> str:
  return f"matfree {NUM_STEPS}, {matvec}, reortho={reortho}"


def check_loops(loops: dict[str, Loop]) -> None:
  """Fails loudly if a row did not compute what its name says."""
  for name, loop in loops.items():
    if not all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(loop.state)):
      raise RuntimeError(f"{name}: the threaded output is not finite at the end of the timing.")
  for matvec in MATVECS:
    for reorthogonalize in REORTHOGONALIZATIONS:
      name = _lanczos_name(matvec, reorthogonalize)
      _, num_valid = loops[name].state
      if num_valid != NUM_STEPS:
        raise RuntimeError(f"{name}: {num_valid} valid steps of {NUM_STEPS} (breakdown).")


def time_curvature(settings: _timing.Settings) -> list[_timing.Timing]:
  params_key, batch_key, tangent_key = jax.random.split(jax.random.key(0), 3)
  params = _mlp.init_mlp(params_key)
  batch = _mlp.random_batch(batch_key)
  tangent = _mlp.normalized(_mlp.init_mlp(tangent_key))
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # each loop donates its own buffers

  loops = {
    "gradient": Loop(gradient_step, copy(params), params, batch),
    "hvp": Loop(hvp_step, copy(tangent), params, batch),
  }
  baselines = {}
  for matvec in MATVECS:
    loops[_loop_name(matvec)] = Loop(hvp_loop_step(matvec), copy(tangent), params, batch)
    baselines[_loop_name(matvec)] = "hvp"
  for matvec in MATVECS:
    for reorthogonalize in REORTHOGONALIZATIONS:
      name = _lanczos_name(matvec, reorthogonalize)
      state = (copy(tangent), jnp.zeros((), jnp.int32))
      loops[name] = DecompositionLoop(lanczos_step(matvec, reorthogonalize), state, params, batch)
      baselines[name] = _loop_name(matvec)
    for reortho in MATFREE_REORTHO:
      name = _matfree_name(matvec, reortho)
      loops[name] = DecompositionLoop(matfree_step(matvec, reortho), copy(tangent), params, batch)
      baselines[name] = _loop_name(matvec)
  for method in SEARCHES:
    loops[_search_name(method)] = Loop(search_step(method), copy(params), params, batch)
    baselines[_search_name(method)] = "gradient"
  timings = _timing.time_interleaved(
    [_timing.Candidate(name, loop, baselines.get(name)) for name, loop in loops.items()],
    settings,
  )
  check_loops(loops)
  return timings


def derived_ratios(median: dict[str, float]) -> dict[str, float]:
  """Ratios computed from the medians ``median[name]`` of the rows."""
  ratios = {"hvp / gradient (target: under 2)": median["hvp"] / median["gradient"]}
  for matvec in MATVECS:
    ratios[f"one of {_loop_name(matvec)} / gradient"] = (
      median[_loop_name(matvec)] / NUM_STEPS / median["gradient"]
    )
  for matvec in MATVECS:
    for reorthogonalize in REORTHOGONALIZATIONS:
      name = _lanczos_name(matvec, reorthogonalize)
      ratios[f"{name} / {_loop_name(matvec)} (target: at most 1.3)"] = (
        median[name] / median[_loop_name(matvec)]
      )
    for reortho in MATFREE_REORTHO:
      name = _matfree_name(matvec, reortho)
      ratios[f"{name} / {_loop_name(matvec)}"] = median[name] / median[_loop_name(matvec)]
  for matvec in MATVECS:
    for reorthogonalize, reortho in ((True, "full"), ("partial", "full"), (False, "none")):
      ours, theirs = _lanczos_name(matvec, reorthogonalize), _matfree_name(matvec, reortho)
      ratios[f"{ours} / {theirs}"] = median[ours] / median[theirs]
  ratios[f"{_lanczos_name('linearized', True)} / {_loop_name('plain')}"] = (
    median[_lanczos_name("linearized", True)] / median[_loop_name("plain")]
  )
  for method in SEARCHES:
    counted = 1 + NUM_STEPS + 3  # the step's gradient and the search's K + 3
    ratios[f"{_search_name(method)} / gradient (counted {counted})"] = (
      median[_search_name(method)] / median["gradient"]
    )
  return ratios


CONV_STEPS = 10  # K for the conv net: its looped rows take seconds a call
CONV_HVPS_LOOP = f"conv: {CONV_STEPS} hvps, fori_loop"
CONV_HVPS_UNROLLED = f"conv: {CONV_STEPS} hvps, unrolled"
CONV_LANCZOS = f"conv: lanczos {CONV_STEPS}, default (unrolled on the CPU)"
CONV_LANCZOS_LOOP = f"conv: lanczos {CONV_STEPS}, unroll=False"


def time_conv(settings: _timing.Settings) -> list[_timing.Timing]:
  """Products and Lanczos on the conv net, in a loop and unrolled, both with reorthogonalisation."""
  params_key, batch_key, tangent_key = jax.random.split(jax.random.key(1), 3)
  params = _conv.init(params_key)
  batch = _conv.random_batch(batch_key)
  tangent = _mlp.normalized(_conv.init(tangent_key))
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
  start = lambda: (copy(tangent), jnp.zeros((), jnp.int32))  # noqa: E731
  loops = {
    CONV_HVPS_UNROLLED: Loop(
      hvp_loop_step("linearized", CONV_STEPS, _conv.loss_fn, unroll=True),
      copy(tangent),
      params,
      batch,
    ),
    CONV_HVPS_LOOP: Loop(
      hvp_loop_step("linearized", CONV_STEPS, _conv.loss_fn), copy(tangent), params, batch
    ),
    CONV_LANCZOS: DecompositionLoop(
      lanczos_step("linearized", True, CONV_STEPS, _conv.loss_fn), start(), params, batch
    ),
    CONV_LANCZOS_LOOP: DecompositionLoop(
      lanczos_step("linearized", True, CONV_STEPS, _conv.loss_fn, unroll=False),
      start(),
      params,
      batch,
    ),
  }
  timings = _timing.time_interleaved(
    [_timing.Candidate(name, loop, CONV_HVPS_UNROLLED) for name, loop in loops.items()], settings
  )
  for name in (CONV_LANCZOS, CONV_LANCZOS_LOOP):
    _, num_valid = loops[name].state
    if num_valid != CONV_STEPS:
      raise RuntimeError(f"{name}: {num_valid} valid steps of {CONV_STEPS} (breakdown).")
  return timings


def conv_ratios(median: dict[str, float]) -> dict[str, float]:
  return {
    f"{CONV_HVPS_LOOP} / {CONV_HVPS_UNROLLED}": median[CONV_HVPS_LOOP] / median[CONV_HVPS_UNROLLED],
    f"{CONV_LANCZOS} / {CONV_HVPS_UNROLLED}": median[CONV_LANCZOS] / median[CONV_HVPS_UNROLLED],
    f"{CONV_LANCZOS_LOOP} / {CONV_LANCZOS}": median[CONV_LANCZOS_LOOP] / median[CONV_LANCZOS],
  }


def timed_table(model: str, num_steps: int, time_rows, ratios, settings) -> dict:
  """Times one table's rows, prints it, and returns what the JSON report keeps of it."""
  load_at_start = os.getloadavg()[0]
  timings = time_rows(settings)
  from_wall, from_cpu = _timing.print_report(
    f"Hessian of the loss of {model}, float32; K = {num_steps}",
    settings,
    load_at_start,
    timings,
    ratios,
  )
  return {
    "load_average_at_start": load_at_start,
    "num_steps": num_steps,
    "timings": _timing.as_json(timings),
    "derived_from_wall_clock": from_wall,
    "derived_from_cpu_time": from_cpu,
  }


def main() -> None:
  args = _timing.argument_parser(__doc__.splitlines()[0]).parse_args()
  settings = _timing.settings_from(args)
  mlp = timed_table(_mlp.description(), NUM_STEPS, time_curvature, derived_ratios, settings)
  conv = timed_table(_conv.description(), CONV_STEPS, time_conv, conv_ratios, settings)
  if args.json:
    _timing.write_json(
      args.json,
      {
        "benchmark": "curvature",
        "environment": _timing.environment(),
        "settings": dataclasses.asdict(settings),
        **mlp,
        "conv": conv,
      },
    )


if __name__ == "__main__":
  main()
