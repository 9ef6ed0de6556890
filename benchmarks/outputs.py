"""Where a benchmark's measurements go: results.json and results.md beside it."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping


def write(out: str, results: Mapping[str, Any], markdown: str) -> None:
  """Writes `results` to `out` (JSON) and `markdown` beside it (.md); prints
  the markdown."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(results, f, indent=2)
  with open(os.path.splitext(out)[0] + '.md', 'w') as f:
    f.write(markdown)
  print(markdown)
