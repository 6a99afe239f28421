"""``python -m experiments attraction-region --quick`` end to end.

Acceptance check 8 (GD and constant-sigma LSGD keep an (n - 1)-dimensional
attraction region), recomputed here independently from the recorded step sizes,
and the report of every candidate modification, whatever its dimension is. The
quick run is shared by the tests of this module; under pytest-xdist the workers
share it through a lock file, so it is computed once per session.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _experiment_runs import assert_is_figure
from _experiment_runs import closing_records
from _experiment_runs import read_metrics
from _experiment_runs import run_experiments
from _experiment_runs import shared_quick_run

from experiments import attraction

QUICK_DIMS = tuple(range(2, 13))
ROTATED_DIMS = (4, 7, 10)
CONSTANT = {"gd": 0.0, "lsgd_sigma=0.5": 0.5, "lsgd_sigma=1": 1.0, "lsgd_sigma=10": 10.0}
MODIFICATIONS = {"lsgd_sigma_on_off": "periodic", "flipped_laplacian": "constant"}
CANDIDATES = (*CONSTANT, *MODIFICATIONS)


@pytest.fixture(scope="session", name="quick_run")
def _quick_run(tmp_path_factory) -> Path:
  return shared_quick_run("attraction-region", tmp_path_factory)


def dimension_records(run_dir: Path) -> list[dict]:
  return [r for r in read_metrics(run_dir) if r.get("check") == "dimension"]


def laplacian(n: int) -> np.ndarray:
  identity = np.eye(n)
  return np.roll(identity, 1, axis=0) + np.roll(identity, -1, axis=0) - 2 * identity


def quick_hessian(problem: str, n: int) -> np.ndarray:
  positive = np.ones(n - 1) if problem == "ones" else np.linspace(0.5, 2.0, n - 1)
  return np.diag(np.concatenate([[-1.0], positive]))


def test_quick_run_writes_config_metrics_figure_and_summary(quick_run):
  config = json.loads((quick_run / "config.json").read_text())
  assert config["experiment"] == "attraction-region"
  assert tuple(config["config"]["dims"]) == QUICK_DIMS

  closing = closing_records(read_metrics(quick_run))
  assert sorted(closing) == sorted(f"{c}/n={n}" for c in CANDIDATES for n in QUICK_DIMS)
  # Nothing is passed off as the paper's method.
  assert not any("mLSGD" in r["label"] for r in closing.values())

  assert_is_figure(quick_run / "figures" / "attraction.png", taller_than=300, wider_than=600)

  summary = (quick_run / "summary.md").read_text()
  assert "figures/attraction.png" in summary
  for problem in ("spread", "ones", "rotated"):
    assert f"## `{problem}`" in summary
  assert "| candidate | n=2 | n=3 |" in summary
  assert "matches ⌊(n−1)/2⌋ for all n? |" in summary


def test_gd_and_constant_sigma_lsgd_keep_an_n_minus_1_dimensional_attraction_region(quick_run):
  """Acceptance check 8, with the dense iteration recomputed here from the recorded step size."""
  records = [r for r in dimension_records(quick_run) if r["candidate"] in CONSTANT]
  seen = {(r["candidate"], r["problem"], r["n"]) for r in records}
  for candidate in CONSTANT:
    for n in QUICK_DIMS:
      assert {(candidate, "spread", n), (candidate, "ones", n)} <= seen
    for n in ROTATED_DIMS:
      assert (candidate, "rotated", n) in seen
  for r in records:
    n = r["n"]
    assert (r["dimension"], r["num_neutral"], r["method"]) == (n - 1, 0, "constant"), r["unit"]
    assert r["dimension_at_minimum"] == n, r["unit"]
    if r["problem"] == "rotated":
      continue
    sigma = CONSTANT[r["candidate"]]
    # laplacian_smoothing leaves vectors shorter than 3 alone.
    smoothing = np.eye(n) - sigma * laplacian(n) if n >= 3 else np.eye(n)
    preconditioned = np.linalg.solve(smoothing, quick_hessian(r["problem"], n))
    assert r["eta"] == pytest.approx(0.9 / np.max(np.abs(np.linalg.eigvals(preconditioned))))
    moduli = np.abs(np.linalg.eigvals(np.eye(n) - r["eta"] * preconditioned))
    assert int(np.sum(moduli < 1)) == r["dimension"]


def test_every_candidate_is_reported_and_its_table_row_agrees_with_the_metrics(quick_run):
  records = dimension_records(quick_run)
  labels = {r["candidate"]: r["label"] for r in read_metrics(quick_run) if r.get("kind") == "unit"}
  summary = (quick_run / "summary.md").read_text()
  spread_table = summary.split("## `spread`")[1].split("## `ones`")[0]
  for candidate in CANDIDATES:
    mine = [r for r in records if r["candidate"] == candidate and r["problem"] == "spread"]
    assert sorted(r["n"] for r in mine) == list(QUICK_DIMS)
    for r in mine:
      assert 0 <= r["dimension"] <= r["n"]
      assert len(r["exponents"]) == r["n"]
      assert r["dimension"] == sum(chi < -r["tol"] for chi in r["exponents"])
    if candidate in MODIFICATIONS:
      assert {r["method"] for r in mine} == {MODIFICATIONS[candidate]}
    row = next(
      line for line in spread_table.splitlines() if line.startswith(f"| {labels[candidate]} |")
    )
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1 : 1 + len(QUICK_DIMS)] == [str(r["dimension"]) for r in mine]
    matches_paper = all(r["dimension"] == (r["n"] - 1) // 2 for r in mine)
    assert cells[-3].startswith("yes" if matches_paper else "no")


def test_the_flipped_laplacian_dimensions_match_a_dense_recomputation(quick_run):
  records = [r for r in dimension_records(quick_run) if r["candidate"] == "flipped_laplacian"]
  assert records
  for r in records:
    n = r["n"]
    operator = np.eye(n) + 0.74 * laplacian(n) if n >= 3 else np.eye(n)
    iteration = np.eye(n) - r["eta"] * np.linalg.solve(operator, quick_hessian(r["problem"], n))
    moduli = np.abs(np.linalg.eigvals(iteration))
    assert int(np.sum(moduli < np.exp(-r["tol"]))) == r["dimension"], r["unit"]


def test_the_on_off_dimensions_match_a_dense_monodromy(quick_run):
  # Recomputed without the library: smoothing with sigma, then a plain GD step; the Floquet
  # exponents are half the logs of the two-step monodromy's moduli.
  sigma = json.loads((quick_run / "config.json").read_text())["config"]["on_off_sigma"]
  records = [
    r
    for r in dimension_records(quick_run)
    if r["candidate"] == "lsgd_sigma_on_off" and r["problem"] != "rotated"
  ]
  assert records
  for r in records:
    n = r["n"]
    hessian = quick_hessian(r["problem"], n)
    smoothing = np.eye(n) - sigma * laplacian(n) if n >= 3 else np.eye(n)
    smoothed_step = np.eye(n) - r["eta"] * np.linalg.solve(smoothing, hessian)
    plain_step = np.eye(n) - r["eta"] * hessian
    moduli = np.abs(np.linalg.eigvals(plain_step @ smoothed_step))
    assert int(np.sum(moduli < np.exp(-2 * r["tol"]))) == r["dimension"], r["unit"]


def test_transform_matrices_agree_with_the_dense_iteration(quick_run):
  mismatches = [
    r["dense_mismatch"]
    for r in dimension_records(quick_run)
    if r["candidate"] != "flipped_laplacian"
  ]
  assert mismatches and max(mismatches) < 1e-12


def test_monte_carlo_cross_checks_agree_with_the_dimensions(quick_run):
  checks = [r for r in read_metrics(quick_run) if r.get("check") == "monte_carlo"]
  assert {r["candidate"] for r in checks} == set(CANDIDATES)
  for r in checks:
    assert r["consistent"], r
    assert r["fraction_random"] == 0.0  # every candidate keeps an unstable direction at n = 5
  stable_fractions = {r["candidate"]: r["fraction_stable_subspace"] for r in checks}
  for candidate in ("gd", "lsgd_sigma=1", "lsgd_sigma_on_off"):
    assert stable_fractions[candidate] == 1.0


def test_resume_recomputes_only_the_unit_that_was_not_finished(quick_run, tmp_path):
  copy = tmp_path / "resumed"
  shutil.copytree(quick_run, copy)
  lines = (copy / "metrics.jsonl").read_text().splitlines()
  last = json.loads(lines[-1])
  assert last["kind"] == "unit"
  (copy / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")

  result = run_experiments("attraction-region", "--resume", str(copy))
  assert f"computed 1 unit(s): {last['unit']}" in result.stdout
  # Each printed table says which problem it is for.
  config = attraction.default_config(quick=True)
  for problem in attraction.PROBLEMS:
    title = attraction.problem_title(problem, config)
    assert f"{problem}: {title}\n| candidate" in result.stdout
  before = [r for r in read_metrics(quick_run) if r.get("kind") != "unit"]
  after = [r for r in read_metrics(copy) if r.get("kind") != "unit"]
  assert after == before
