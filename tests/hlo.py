"""Reading compiled HLO text in tests."""

import re


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
