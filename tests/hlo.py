"""Reading programs in tests: jaxprs and compiled HLO text."""

import re

import jax
import jax.extend


def equations(jaxpr):
  """Every equation of ``jaxpr`` and, depth first, of the jaxprs inside it (loops, calls)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from equations(sub)


def largest_intermediate(jaxpr) -> int:
  """Elements of the largest value any equation of ``jaxpr`` (or of a jaxpr inside it) makes."""
  return max(var.aval.size for eqn in equations(jaxpr) for var in eqn.outvars)


def collectives(hlo: str) -> list[tuple[str, str, list[str]]]:
  """``(computation, op, result shapes)`` of each collective op of compiled HLO text; the
  computation is ``ENTRY`` for the program's top level."""
  found, computation = [], None
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      computation = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
    match = re.search(r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|"
                      r"collective-permute)(?:-start)?\(", line)
    if match:
      found.append((computation, match.group(2), re.findall(r"\w+\[[\d,]*\]", match.group(1))))
  return found
