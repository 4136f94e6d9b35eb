"""Ensembles of bert-jax runs: stacked params evaluated in one vmapped pass, declarative nested specs
compiled to one weight matrix, and weight-space soups.

  ensemble.stack     stack / unstack param trees (leading member axis), the vmapped eval function
  ensemble.spec      the YAML/JSON spec (average / task nodes), compile_weights, combine, naive_scores
  ensemble.evaluate  load runs, group + stack them, score a split, per-member / per-node metrics table
  ensemble.soup      uniform and greedy soups (parameter averages)
  ensemble.timing    vmapped vs sequential timing (`time_ensemble`, used by `bert-jax bench`)
"""

from ensemble.soup import greedy_soup, uniform_soup
from ensemble.spec import EnsembleSpec, SpecError, compile_weights, combine, load_spec, naive_scores, parse_spec
from ensemble.stack import StructureError, make_stacked_eval_fn, stack, unstack

__all__ = [
    "EnsembleSpec",
    "SpecError",
    "StructureError",
    "combine",
    "compile_weights",
    "greedy_soup",
    "load_spec",
    "make_stacked_eval_fn",
    "naive_scores",
    "parse_spec",
    "stack",
    "uniform_soup",
    "unstack",
]
