"""Hessian eigenvalue and trace against PyHessian, and the cost of monitor_curvature in training.

Run with ``python -m benchmarks.spectrum [--quick] [--json PATH]``.

The Hessian is that of the mean softmax cross-entropy of a 784-512-512-10 ReLU MLP on a fixed
batch of 128 random inputs, at fixed He-initialised params (``benchmarks/_mlp.py``). PyHessian
gets the same network as a ``torch.nn.Sequential`` of ``nn.Linear`` layers holding a copy of
the JAX weights (transposed: torch stores ``(out, in)``), the same batch and
``nn.CrossEntropyLoss``; the two losses are checked to agree before anything is timed. Torch
runs where JAX does: on the CPU with as many threads as XLA's CPU client, one per schedulable
core; on the same card when JAX's backend is a GPU (then PyHessian gets ``cuda=True``).

**Against PyHessian.** Every row is one whole call, building the Hessian operator included
(PyHessian's ``hessian(...)`` runs the forward pass and the backward pass with
``create_graph``; ours linearises, or for the trace runs the loss's forward pass, inside the
jitted call):

- top eigenvalue: PyHessian's ``eigenvalues()`` is power iteration with its defaults
  (``maxIter=100``, ``tol=1e-3``: it stops when two consecutive Rayleigh quotients differ by
  less than ``tol`` relatively); ours is ``jaxsaddle.spectrum.hessian_extreme_eigenvalues``,
  Lanczos with a step count fixed in advance, in three rows. ``residual``: the fewest steps whose
  relative residual ``||H v - theta v|| / |theta|`` is at most the same ``tol`` from every one
  of a few start vectors (the residual bounds the error: an eigenvalue lies within it; a
  stricter test than PyHessian's). ``PyHessian's rule``: the fewest steps at which, from every
  one of those start vectors, the top Ritz value changed by less than ``tol`` relatively from
  the step before, PyHessian's own stopping test applied to Lanczos, timed twice: returning the
  eigenvector, as PyHessian's call does, and with ``eigenvectors=False``, which asks for the top
  eigenvalue alone, so that Lanczos keeps no basis. The residual comes from the Lanczos
  relation, without another Hessian-vector product (HVP); the calibration also computes it
  directly and checks the two agree. All are compared with a reference from many Lanczos
  steps. A fourth row times what the PyHessian's-rule call cannot skip: the
  linearisation, the start vector and its HVPs, normalised and chained, with no Lanczos
  recurrence, basis or Ritz vector. Its ratio to PyHessian is the floor of any Lanczos run of
  that many steps, so it says whether a target is out of reach of the overhead alone.
- trace: PyHessian's ``trace()`` is Hutchinson with Rademacher probes and its defaults, which
  stop when the running mean changes by less than ``tol`` relatively; its probe count is
  random, so its seed is fixed, and ours (``jaxsaddle.spectrum.hessian_trace``, Hutchinson)
  uses that many probes, one after another (its default ``probe_batch_size=1``). PyHessian
  takes each quadratic form ``z . (H z)`` from a Hessian-vector product; ours takes it as the
  second directional derivative, forward-over-forward, which needs no backward pass.

PyHessian's calls reseed torch, so every timed call does the same iterations as the one whose
HVPs were counted. Ours thread a PRNG key from call to call (see ``benchmarks/_timing.py``).

**monitor_curvature.** The jitted training step of ``benchmarks/perturbation.py``
(``value_and_grad``, ``tx.update``, here also given ``value_fn``, and ``optax.apply_updates``,
params and state donated) with ``optax.sgd`` against ``optax.chain(optax.sgd,
jaxsaddle.monitor_curvature(every=100, ...))``. A window row is 100 consecutive steps, each
its own jitted call as in a training loop, so it contains exactly one estimating step. Two
single-step rows split the cost: the monitor estimating at every step (``every=1``), and never
estimating (``every=2**30``, the skipped ``lax.cond`` branch only), from which the window
ratio is predicted as a check and the ``every`` that meets the target is derived. After the
timing, every monitored row's state is checked to hold an estimate from the step its ``every``
implies, and the size of XLA's temporary buffer for each step is printed: on the CPU it is
allocated at every call and sized for the branch not taken too.
"""

import dataclasses
import importlib
import importlib.metadata
import os
import warnings
from collections.abc import Callable
from typing import Any
from typing import NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyhessian
import torch

import jaxsaddle
from benchmarks import _mlp
from benchmarks import _timing
from jaxsaddle import _random
from jaxsaddle import spectrum

TOLERANCE = 1e-3  # PyHessian's default tol, for its eigenvalues and its trace
PYHESSIAN_SEED = 0
CALIBRATION_SEEDS = 10  # start vectors that must all meet the tolerance
MAX_LANCZOS_STEPS = 60
REFERENCE_LANCZOS_STEPS = 60
EIGENVALUE_AGREEMENT = 1e-2  # the largest relative difference from PyHessian accepted
# The largest difference between the two trace estimates accepted, in standard errors of the
# difference; both are seeded, so a failure is not a fluke of one run.
TRACE_AGREEMENT = 5.0

LEARNING_RATE = 1e-2
MONITOR_EVERY = 100
MONITOR_LANCZOS_STEPS = 20
NEVER = 2**30
OVERHEAD_TARGET = 1.02
SPEEDUP_TARGET = 2.5

# The row names, used again by the derived ratios.
PYHESSIAN_EIGENVALUE = "pyhessian eigenvalues (power iteration)"
OUR_EIGENVALUE = "jaxsaddle hessian_extreme_eigenvalues (lanczos, residual)"
OUR_EIGENVALUE_RULE = "jaxsaddle hessian_extreme_eigenvalues (lanczos, PyHessian's rule)"
OUR_EIGENVALUE_ONLY = f"{OUR_EIGENVALUE_RULE[:-1]}, eigenvectors=False)"
PRODUCTS_ALONE = "its Hessian-vector products alone (linearised, normalised)"
PYHESSIAN_TRACE = "pyhessian trace (hutchinson)"
OUR_TRACE = "jaxsaddle hessian_trace (hutchinson)"
SGD_WINDOW = f"optax.sgd, {MONITOR_EVERY} steps"
MONITORED_WINDOW = f"sgd + monitor_curvature(every={MONITOR_EVERY}), {MONITOR_EVERY} steps"
SGD_STEP = "optax.sgd, 1 step"
ESTIMATING_STEP = "sgd + monitor_curvature(every=1), 1 step"
SKIPPING_STEP = "sgd + monitor_curvature(every=2**30), 1 step"


def torch_device() -> torch.device:
  """The GPU when JAX runs on one, so that both libraries use the same card; else the CPU."""
  return torch.device("cuda" if jax.default_backend() == "gpu" else "cpu")


def torch_device_description(num_threads: int) -> str:
  device = torch_device()
  if device.type == "cuda":
    return torch.cuda.get_device_name(device)
  return f"CPU, {num_threads} threads"


def torch_mlp(params) -> torch.nn.Sequential:
  """The MLP of ``_mlp.loss_fn`` with a copy of ``params``, as torch layers."""
  layers = []
  for layer in params:
    linear = torch.nn.Linear(*layer["w"].shape)
    with torch.no_grad():
      linear.weight.copy_(torch.from_numpy(np.array(layer["w"]).T))
      linear.bias.copy_(torch.from_numpy(np.array(layer["b"])))
    layers += [linear, torch.nn.ReLU()]
  return torch.nn.Sequential(*layers[:-1])


@dataclasses.dataclass(frozen=True)
class Problem:
  """One Hessian, in JAX (``value_fn`` at ``params``) and in torch (model, loss, data)."""

  params: list
  batch: tuple
  model: torch.nn.Module
  criterion: torch.nn.Module
  data: tuple[torch.Tensor, torch.Tensor]

  def value_fn(self, params) -> jax.Array:
    return _mlp.loss_fn(params, self.batch)


def make_problem() -> Problem:
  params_key, batch_key = jax.random.split(jax.random.key(0))
  params = _mlp.init_mlp(params_key)
  inputs, labels = batch = _mlp.random_batch(batch_key)
  device = torch_device()
  model = torch_mlp(params).to(device)
  criterion = torch.nn.CrossEntropyLoss()
  data = (
    torch.from_numpy(np.array(inputs)).to(device),
    torch.from_numpy(np.array(labels)).long().to(device),
  )
  problem = Problem(params, batch, model, criterion, data)
  with torch.no_grad():
    torch_loss = criterion(model(data[0]), data[1]).item()
  jax_loss = float(problem.value_fn(params))
  if abs(torch_loss - jax_loss) > 1e-5 * abs(jax_loss):
    raise RuntimeError(f"the torch loss {torch_loss} is not the JAX loss {jax_loss}.")
  return problem


def pyhessian_call(problem: Problem, method: str):
  """``() -> PyHessian's result``: a fresh ``hessian`` object, then ``method()``, seeded."""

  def call():
    torch.manual_seed(PYHESSIAN_SEED)
    # A gradient left from an earlier call would be added to the new one.
    problem.model.zero_grad(set_to_none=True)
    hessian = pyhessian.hessian(
      problem.model, problem.criterion, data=problem.data, cuda=problem.data[0].is_cuda
    )
    return getattr(hessian, method)()

  return call


def count_pyhessian_hvps(call: Callable):
  """Runs ``call`` and counts the HVPs PyHessian computes; returns (result, count)."""
  module = importlib.import_module("pyhessian.hessian")
  product = module.hessian_vector_product
  count = 0

  def counting_product(*args):
    nonlocal count
    count += 1
    return product(*args)

  with mock.patch.object(module, "hessian_vector_product", counting_product):
    result = call()
  return result, count


class KeyLoop:
  """A timing candidate's step: ``key, output = step(key, params, batch)``, jitted.

  The key threads one call into the next; ``estimate(key, params, batch)`` is the work.
  """

  def __init__(self, estimate, problem: Problem):
    def step(key, params, batch):
      key, estimate_key = jax.random.split(key)
      return key, estimate(estimate_key, params, batch)

    self._step = jax.jit(step)
    self._arguments = (problem.params, problem.batch)
    self.key = jax.random.key(1)
    self.output = None

  def __call__(self):
    self.key, self.output = self._step(self.key, *self._arguments)
    return self.key, self.output


def top_eigenvalue(num_steps: int, exact_residuals: bool = False, eigenvectors: bool = True):
  """``(key, params, batch) -> RitzPairs`` of the top eigenvalue, ``num_steps`` Lanczos steps.

  With ``exact_residuals`` the residual norm is computed with one more HVP instead of taken
  from the Lanczos relation. Without ``eigenvectors`` Lanczos keeps no basis.
  """

  def estimate(key, params, batch):
    value_fn = lambda p: _mlp.loss_fn(p, batch)
    return spectrum.hessian_extreme_eigenvalues(
      value_fn,
      params,
      num_steps=num_steps,
      key=key,
      k=1,
      which="largest",
      eigenvectors=eigenvectors,
      exact_residuals=exact_residuals,
    )

  return estimate


def products_alone(num_steps: int):
  """``(key, params, batch) -> vector``: what the ``num_steps``-step eigenvalue call cannot skip.

  The linearisation, a Gaussian start vector and ``num_steps`` HVPs, each product normalised and
  fed to the next (power iteration without its eigenvalue): the cost floor of any Lanczos run of
  that many steps, with no recurrence, basis or Ritz vector.
  """

  def estimate(key, params, batch):
    _, hvp_fn = jaxsaddle.linearize_hvp(lambda p: _mlp.loss_fn(p, batch), params)
    start = _mlp.normalized(_random.tree_standard_normal(key, params))
    return jax.lax.fori_loop(0, num_steps, lambda _, v: _mlp.normalized(hvp_fn(v)), start)

  return estimate


def trace(num_probes: int):
  """``(key, params, batch) -> Estimate`` of the trace from ``num_probes`` Rademacher probes."""

  def estimate(key, params, batch):
    value_fn = lambda p: _mlp.loss_fn(p, batch)
    return spectrum.hessian_trace(value_fn, params, key=key, num_probes=num_probes)

  return estimate


def relative_residuals(pairs) -> np.ndarray:
  return np.asarray(pairs.residual_norms / jnp.abs(pairs.eigenvalues))


def reference_eigenvalue(problem: Problem) -> float:
  pairs = jax.jit(top_eigenvalue(REFERENCE_LANCZOS_STEPS, exact_residuals=True))(
    jax.random.key(0), problem.params, problem.batch
  )
  if not relative_residuals(pairs)[0] <= 1e-2 * TOLERANCE:
    raise RuntimeError(
      f"the reference eigenvalue did not converge in {REFERENCE_LANCZOS_STEPS} Lanczos steps "
      f"(relative residual {relative_residuals(pairs)[0]:.1e})."
    )
  return float(pairs.eigenvalues[0])


class Calibration(NamedTuple):
  """Step counts for the two stopping tests and what they gave from each start vector."""

  residual_steps: int  # the fewest with relative residual <= TOLERANCE from every start
  residual_pairs: Any  # RitzPairs at residual_steps, stacked over the start vectors
  rule_steps: int  # the fewest at which PyHessian's test passes from every start
  rule_eigenvalues: np.ndarray  # the top eigenvalue at rule_steps from each start


def calibrate_lanczos_steps(problem: Problem) -> Calibration:
  """The fewest Lanczos steps that pass each stopping test from every start vector.

  The residuals are computed directly; the timed call's Lanczos estimates of them, from the same
  start vectors, must agree. PyHessian's test compares the top eigenvalue estimate with the
  previous step's: ``|theta_m - theta_{m-1}| < TOLERANCE |theta_{m-1}|``.
  """
  keys = jax.random.split(jax.random.key(2), CALIBRATION_SEEDS)

  def run(num_steps, exact_residuals):
    estimate = top_eigenvalue(num_steps, exact_residuals)
    return jax.jit(jax.vmap(estimate, in_axes=(0, None, None)))(keys, problem.params, problem.batch)

  previous = None
  rule = residual = None
  for num_steps in range(1, MAX_LANCZOS_STEPS + 1):
    pairs = run(num_steps, exact_residuals=True)
    top = np.asarray(pairs.eigenvalues[:, 0], np.float64)
    if (
      rule is None
      and previous is not None
      and np.all(np.abs(top - previous) < TOLERANCE * np.abs(previous))
    ):
      rule = (num_steps, top)
    previous = top
    if residual is None and np.all(relative_residuals(pairs) <= TOLERANCE):
      estimated = relative_residuals(run(num_steps, exact_residuals=False))
      if not np.allclose(estimated, relative_residuals(pairs), rtol=0.05, atol=1e-6):
        raise RuntimeError(
          f"the Lanczos residual estimates {estimated} are not the direct residuals "
          f"{relative_residuals(pairs)}."
        )
      residual = (num_steps, pairs)
    if rule is not None and residual is not None:
      return Calibration(*residual, *rule)
  if residual is None:
    raise RuntimeError(
      f"no Lanczos run of at most {MAX_LANCZOS_STEPS} steps reached the relative residual "
      f"{TOLERANCE}."
    )
  raise RuntimeError(
    f"no Lanczos run of at most {MAX_LANCZOS_STEPS} steps passed PyHessian's test at {TOLERANCE}."
  )


def relative_difference(value: float, reference: float) -> float:
  return abs(value - reference) / abs(reference)


def check_eigenvalue(
  name: str, value: float, reference: float, tolerance: float = EIGENVALUE_AGREEMENT
) -> None:
  if not relative_difference(value, reference) <= tolerance:
    raise RuntimeError(
      f"{name}: the top eigenvalue {value} is not within {tolerance:.1e} relatively of {reference}."
    )


def compare_with_pyhessian(problem: Problem, settings: _timing.Settings):
  """Times both libraries; returns the timings and what each computed."""
  reference = reference_eigenvalue(problem)
  calibration = calibrate_lanczos_steps(problem)
  num_steps = calibration.residual_steps
  our_eigenvalues = np.asarray(calibration.residual_pairs.eigenvalues[:, 0])
  (pyhessian_eigenvalues, _), pyhessian_eigenvalue_hvps = count_pyhessian_hvps(
    pyhessian_call(problem, "eigenvalues")
  )
  quadratic_forms, num_probes = count_pyhessian_hvps(pyhessian_call(problem, "trace"))
  if len(quadratic_forms) != num_probes:
    raise RuntimeError(f"PyHessian's trace: {len(quadratic_forms)} probes but {num_probes} HVPs.")

  loops = {
    OUR_EIGENVALUE: KeyLoop(top_eigenvalue(num_steps), problem),
    OUR_EIGENVALUE_RULE: KeyLoop(top_eigenvalue(calibration.rule_steps), problem),
    OUR_EIGENVALUE_ONLY: KeyLoop(
      top_eigenvalue(calibration.rule_steps, eigenvectors=False), problem
    ),
    PRODUCTS_ALONE: KeyLoop(products_alone(calibration.rule_steps), problem),
    OUR_TRACE: KeyLoop(trace(num_probes), problem),
  }
  timings = _timing.time_interleaved(
    [
      _timing.Candidate(PYHESSIAN_EIGENVALUE, pyhessian_call(problem, "eigenvalues")),
      _timing.Candidate(OUR_EIGENVALUE, loops[OUR_EIGENVALUE], PYHESSIAN_EIGENVALUE),
      _timing.Candidate(OUR_EIGENVALUE_RULE, loops[OUR_EIGENVALUE_RULE], PYHESSIAN_EIGENVALUE),
      _timing.Candidate(OUR_EIGENVALUE_ONLY, loops[OUR_EIGENVALUE_ONLY], PYHESSIAN_EIGENVALUE),
      _timing.Candidate(PRODUCTS_ALONE, loops[PRODUCTS_ALONE], PYHESSIAN_EIGENVALUE),
      _timing.Candidate(PYHESSIAN_TRACE, pyhessian_call(problem, "trace")),
      _timing.Candidate(OUR_TRACE, loops[OUR_TRACE], PYHESSIAN_TRACE),
    ],
    settings,
  )
  # The last timed calls of ours, from start vectors the calibration did not see, at the
  # accuracy their rows claim: the tolerance, and for the residual row its residual too.
  for name in (OUR_EIGENVALUE, OUR_EIGENVALUE_RULE, OUR_EIGENVALUE_ONLY):
    check_eigenvalue(name, float(loops[name].output.eigenvalues[0]), reference, TOLERANCE)
  timed_residual = float(relative_residuals(loops[OUR_EIGENVALUE].output)[0])
  if not timed_residual <= TOLERANCE:
    raise RuntimeError(
      f"{OUR_EIGENVALUE}: the last timed call's relative residual {timed_residual:.1e} is above "
      f"{TOLERANCE}; its start vector needed more steps than the calibration's."
    )
  if not np.isfinite(float(loops[OUR_TRACE].output.value)):
    raise RuntimeError(f"{OUR_TRACE}: the last timed estimate is not finite.")

  our_trace = jax.jit(trace(num_probes))(jax.random.key(0), problem.params, problem.batch)
  theirs = float(pyhessian_eigenvalues[0])
  check_eigenvalue(PYHESSIAN_EIGENVALUE, theirs, reference)
  for ours in our_eigenvalues:
    check_eigenvalue(OUR_EIGENVALUE, float(ours), theirs)
  for ours in calibration.rule_eigenvalues:
    check_eigenvalue(OUR_EIGENVALUE_RULE, float(ours), theirs)
  their_trace = float(np.mean(quadratic_forms))
  their_error = float(np.std(quadratic_forms, ddof=1) / np.sqrt(num_probes))
  distance = abs(float(our_trace.value) - their_trace) / np.hypot(
    float(our_trace.standard_error), their_error
  )
  if not distance <= TRACE_AGREEMENT:
    raise RuntimeError(
      f"the traces differ by {distance:.1f} standard errors: ours {float(our_trace.value)}, "
      f"PyHessian's {their_trace}."
    )
  results = {
    "reference_eigenvalue": reference,
    "reference_lanczos_steps": REFERENCE_LANCZOS_STEPS,
    "pyhessian_eigenvalue": theirs,
    "pyhessian_eigenvalue_hvps": pyhessian_eigenvalue_hvps,
    "our_eigenvalue": float(our_eigenvalues[0]),
    "our_largest_relative_error": float(np.max(np.abs(our_eigenvalues - reference)) / reference),
    "our_largest_relative_residual": float(np.max(relative_residuals(calibration.residual_pairs))),
    "our_start_vectors": CALIBRATION_SEEDS,
    "our_lanczos_steps": num_steps,
    "our_eigenvalue_hvps": num_steps,
    "our_rule_eigenvalue": float(calibration.rule_eigenvalues[0]),
    "our_rule_largest_relative_error": float(
      np.max(np.abs(calibration.rule_eigenvalues - reference)) / reference
    ),
    "our_rule_lanczos_steps": calibration.rule_steps,
    "num_probes": num_probes,
    "pyhessian_trace": their_trace,
    "pyhessian_trace_standard_error": their_error,
    "our_trace": float(our_trace.value),
    "our_trace_standard_error": float(our_trace.standard_error),
    "trace_difference_in_standard_errors": float(distance),
  }
  return timings, results


def print_accuracy(results: dict) -> None:
  reference = results["reference_eigenvalue"]
  print(
    f"\nWhat each computed (reference: the top eigenvalue from "
    f"{results['reference_lanczos_steps']} Lanczos steps, {reference:.6g}):\n"
  )
  print("| what | value | relative error | HVPs |")
  print("|---|---:|---:|---:|")
  for name, value, hvps in (
    (PYHESSIAN_EIGENVALUE, results["pyhessian_eigenvalue"], results["pyhessian_eigenvalue_hvps"]),
    (
      f"{OUR_EIGENVALUE}, {results['our_lanczos_steps']} steps",
      results["our_eigenvalue"],
      results["our_eigenvalue_hvps"],
    ),
    (
      f"{OUR_EIGENVALUE_RULE}, {results['our_rule_lanczos_steps']} steps",
      results["our_rule_eigenvalue"],
      results["our_rule_lanczos_steps"],
    ),
  ):
    print(f"| {name} | {value:.6g} | {relative_difference(value, reference):.1e} | {hvps} |")
  print(
    f"\nOurs is from the first of {results['our_start_vectors']} start vectors; over all of them "
    f"the largest relative error is {results['our_largest_relative_error']:.1e} and the largest "
    f"relative residual {results['our_largest_relative_residual']:.1e} (tolerance {TOLERANCE}); "
    "with PyHessian's rule the largest relative error is "
    f"{results['our_rule_largest_relative_error']:.1e}. "
    "Ours and PyHessian's differ by "
    f"{relative_difference(results['our_eigenvalue'], results['pyhessian_eigenvalue']):.1e} "
    f"relatively (accepted: {EIGENVALUE_AGREEMENT}).\n"
  )
  print("| trace, Hutchinson | estimate | standard error | probes (HVPs) |")
  print("|---|---:|---:|---:|")
  for name, value, error in (
    ("pyhessian", results["pyhessian_trace"], results["pyhessian_trace_standard_error"]),
    ("jaxsaddle", results["our_trace"], results["our_trace_standard_error"]),
  ):
    print(f"| {name} | {value:.6g} | {error:.3g} | {results['num_probes']} |")
  print(
    f"\nThe estimates differ by {results['trace_difference_in_standard_errors']:.2f} standard "
    "errors of their difference."
  )


def pyhessian_ratios(median: dict[str, float]) -> dict[str, float]:
  return {
    **{
      f"{name} / {PYHESSIAN_EIGENVALUE} "
      f"(target: at most {1 / SPEEDUP_TARGET:.2f}, {SPEEDUP_TARGET}x faster)": (
        median[name] / median[PYHESSIAN_EIGENVALUE]
      )
      for name in (OUR_EIGENVALUE, OUR_EIGENVALUE_RULE, OUR_EIGENVALUE_ONLY)
    },
    f"{PRODUCTS_ALONE}, the floor of the PyHessian's rule rows, / {PYHESSIAN_EIGENVALUE}": (
      median[PRODUCTS_ALONE] / median[PYHESSIAN_EIGENVALUE]
    ),
    **{
      f"{name} / {PRODUCTS_ALONE} (the Lanczos overhead)": median[name] / median[PRODUCTS_ALONE]
      for name in (OUR_EIGENVALUE_RULE, OUR_EIGENVALUE_ONLY)
    },
    f"{OUR_TRACE} / {PYHESSIAN_TRACE} (target: at most {1 / SPEEDUP_TARGET:.2f})": (
      median[OUR_TRACE] / median[PYHESSIAN_TRACE]
    ),
  }


def training_step(tx: optax.GradientTransformationExtraArgs):
  """``(params, opt_state, batch) -> (params, opt_state)``, passing ``value_fn`` to ``tx``."""

  def step(params, opt_state, batch):
    value_fn = lambda p: _mlp.loss_fn(p, batch)
    loss, grads = jax.value_and_grad(value_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss, value_fn=value_fn)
    return optax.apply_updates(params, updates), opt_state

  return step


def monitored_sgd(every: int) -> optax.GradientTransformationExtraArgs:
  return optax.chain(
    optax.sgd(LEARNING_RATE),
    jaxsaddle.monitor_curvature(every=every, num_lanczos_steps=MONITOR_LANCZOS_STEPS),
  )


def training_arguments(tx) -> tuple:
  """``(params, opt_state, batch)`` at the start of training."""
  params_key, batch_key = jax.random.split(jax.random.key(0))
  params = _mlp.init_mlp(params_key)
  return params, tx.init(params), _mlp.random_batch(batch_key)


def training_loop(tx) -> _mlp.TrainingLoop:
  return _mlp.TrainingLoop(training_step(tx), *training_arguments(tx))


class Window:
  """A timing candidate's step: ``length`` training steps, each its own jitted call."""

  def __init__(self, loop: _mlp.TrainingLoop, length: int):
    self.loop = loop
    self._length = length

  def __call__(self):
    for _ in range(self._length):
      output = self.loop()
    return output


def check_monitors(loops: dict[str, _mlp.TrainingLoop], everies: dict[str, int]) -> None:
  """Fails loudly if a monitored row did not estimate when its name says it did."""
  for name, loop in loops.items():
    if not all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(loop.params)):
      raise RuntimeError(f"{name}: params are not finite at the end of the timing.")
  for name, every in everies.items():
    state = loops[name].opt_state
    count = int(optax.tree.get(state, "count"))
    step = int(optax.tree.get(state, "eigenvalue_step"))
    if step != (count - 1) // every * every:
      raise RuntimeError(f"{name}: the last estimate was at step {step} of {count}.")
    for end in ("smallest_eigenvalue", "largest_eigenvalue"):
      if not np.isfinite(float(optax.tree.get(state, end))):
        raise RuntimeError(f"{name}: {end} is not finite.")


def time_monitoring(settings: _timing.Settings) -> list[_timing.Timing]:
  loops = {
    SGD_WINDOW: training_loop(optax.sgd(LEARNING_RATE)),
    MONITORED_WINDOW: training_loop(monitored_sgd(MONITOR_EVERY)),
    SGD_STEP: training_loop(optax.sgd(LEARNING_RATE)),
    ESTIMATING_STEP: training_loop(monitored_sgd(1)),
    SKIPPING_STEP: training_loop(monitored_sgd(NEVER)),
  }
  windows = {name: Window(loops[name], MONITOR_EVERY) for name in (SGD_WINDOW, MONITORED_WINDOW)}
  timings = _timing.time_interleaved(
    [
      _timing.Candidate(SGD_WINDOW, windows[SGD_WINDOW]),
      _timing.Candidate(MONITORED_WINDOW, windows[MONITORED_WINDOW], SGD_WINDOW),
      _timing.Candidate(SGD_STEP, loops[SGD_STEP]),
      _timing.Candidate(ESTIMATING_STEP, loops[ESTIMATING_STEP], SGD_STEP),
      _timing.Candidate(SKIPPING_STEP, loops[SKIPPING_STEP], SGD_STEP),
    ],
    settings,
  )
  check_monitors(loops, {MONITORED_WINDOW: MONITOR_EVERY, ESTIMATING_STEP: 1, SKIPPING_STEP: NEVER})
  return timings


def temporary_megabytes(tx) -> float:
  """The temporary buffer XLA allocates for each call of the jitted training step, in MiB.

  On the CPU it is allocated at every call, branches not taken included; above the C
  library's threshold (32 MiB by default in glibc) that is a fresh ``mmap`` whose pages fault
  in again at every step.
  """
  lowered = jax.jit(training_step(tx), donate_argnums=(0, 1)).lower(*training_arguments(tx))
  return lowered.compile().memory_analysis().temp_size_in_bytes / 2**20


def monitoring_ratios(median: dict[str, float]) -> dict[str, float]:
  """The window ratio, and the same predicted from single steps; the ``every`` the target needs.

  A window of ``every`` steps holds one estimating step and ``every - 1`` skipping ones, so
  its ratio to SGD is ``1 + (estimating - skipping) / (every sgd) + (skipping - sgd) / sgd``.
  """
  sgd, estimating, skipping = median[SGD_STEP], median[ESTIMATING_STEP], median[SKIPPING_STEP]
  predicted = (estimating + (MONITOR_EVERY - 1) * skipping) / (MONITOR_EVERY * sgd)
  allowance = OVERHEAD_TARGET - skipping / sgd
  return {
    f"{MONITORED_WINDOW} / {SGD_WINDOW} (target: at most {OVERHEAD_TARGET})": (
      median[MONITORED_WINDOW] / median[SGD_WINDOW]
    ),
    "the same, predicted from the single steps": predicted,
    "estimating step / sgd step": estimating / sgd,
    "skipping step / sgd step": skipping / sgd,
    f"every needed for at most {OVERHEAD_TARGET} (inf: the skipping steps alone exceed it)": (
      (estimating - skipping) / (allowance * sgd) if allowance > 0 else float("inf")
    ),
    f"every needed for at most {OVERHEAD_TARGET} if skipping steps cost what sgd steps do": (
      (estimating - sgd) / ((OVERHEAD_TARGET - 1) * sgd)
    ),
  }


def warn_if_busy(load_at_start: float, num_threads: int) -> None:
  """Says so when processes other than this one's threads kept the cores busy."""
  load = max(load_at_start, os.getloadavg()[0])
  if load > num_threads + 1:
    print(
      f"\nThe machine was busy (load average {load:.1f} on {num_threads} cores). Torch's "
      "OpenMP threads spin-wait for one another at every parallel region, so when another "
      "process holds a core PyHessian can run many times slower, in CPU time as well as in "
      "wall-clock time: read the ratios to PyHessian from a run on an idle machine."
    )


def main() -> None:
  args = _timing.argument_parser(__doc__.splitlines()[0]).parse_args()
  settings = _timing.settings_from(args)
  # XLA's CPU client runs one thread per schedulable core; torch gets the same.
  num_threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(num_threads)
  # PyHessian calls backward(create_graph=True), and torch warns of the reference cycle between
  # params and grads that makes; every call here first sets the grads to None, which breaks it.
  warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
  # Torch multiplies float32 matrices in full float32 by default; JAX's default on a GPU may use
  # TF32, which would also put PyHessian's 1e-3 tolerance near the rounding of the products.
  jax.config.update("jax_default_matmul_precision", "highest")
  load_at_start = os.getloadavg()[0]
  problem = make_problem()
  pyhessian_timings, results = compare_with_pyhessian(problem, settings)
  pyhessian_from_wall, pyhessian_from_cpu = _timing.print_report(
    f"Top Hessian eigenvalue and trace of the loss of {_mlp.description()}, float32 with "
    "full-precision matrix products in both libraries, against "
    f"PyHessian {importlib.metadata.version('pyhessian')} on torch {torch.__version__} "
    f"({torch_device_description(num_threads)}). PyHessian's eigenvalue is power iteration "
    f"(tol {TOLERANCE}, "
    f"{results['pyhessian_eigenvalue_hvps']} HVPs), ours Lanczos "
    f"({results['our_lanczos_steps']} steps, the fewest with relative residual at most "
    f"{TOLERANCE} from {CALIBRATION_SEEDS} start vectors; {results['our_rule_lanczos_steps']} "
    "steps, the fewest that pass PyHessian's test from all of them); both "
    f"traces are Hutchinson with {results['num_probes']} Rademacher probes (PyHessian's "
    f"count at tol {TOLERANCE}, seed {PYHESSIAN_SEED})",
    settings,
    load_at_start,
    pyhessian_timings,
    pyhessian_ratios,
  )
  warn_if_busy(load_at_start, num_threads)
  print_accuracy(results)
  print()
  load_at_start = os.getloadavg()[0]
  monitoring_timings = time_monitoring(settings)
  monitoring_from_wall, monitoring_from_cpu = _timing.print_report(
    f"Training step of {_mlp.description()}, params and state donated, with and without "
    f"jaxsaddle.monitor_curvature ({MONITOR_LANCZOS_STEPS} Lanczos steps, which='both')",
    settings,
    load_at_start,
    monitoring_timings,
    monitoring_ratios,
  )

  temporaries = {
    "optax.sgd": temporary_megabytes(optax.sgd(LEARNING_RATE)),
    f"sgd + monitor_curvature (num_lanczos_steps={MONITOR_LANCZOS_STEPS})": temporary_megabytes(
      monitored_sgd(MONITOR_EVERY)
    ),
  }
  print(
    "\nXLA's temporary buffer per call of the step (allocated at every call on the CPU, for "
    "branches not taken too): "
    + ", ".join(f"{name} {size:.1f} MiB" for name, size in temporaries.items())
    + "."
  )

  if args.json:
    _timing.write_json(
      args.json,
      {
        "benchmark": "spectrum",
        "environment": {
          **_timing.environment(),
          "torch": torch.__version__,
          "torch_threads": num_threads,
          "torch_device": torch_device_description(num_threads),
          "pyhessian": importlib.metadata.version("pyhessian"),
        },
        "settings": dataclasses.asdict(settings),
        "pyhessian": {
          "results": results,
          "timings": _timing.as_json(pyhessian_timings),
          "derived_from_wall_clock": pyhessian_from_wall,
          "derived_from_cpu_time": pyhessian_from_cpu,
        },
        "monitor_curvature": {
          "every": MONITOR_EVERY,
          "num_lanczos_steps": MONITOR_LANCZOS_STEPS,
          "temporary_buffer_mib": temporaries,
          "timings": _timing.as_json(monitoring_timings),
          "derived_from_wall_clock": monitoring_from_wall,
          "derived_from_cpu_time": monitoring_from_cpu,
        },
      },
    )


if __name__ == "__main__":
  main()
