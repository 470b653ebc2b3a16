"""Reading programs in tests: jaxprs."""

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

