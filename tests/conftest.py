"""Suite-wide settings.

`reasonbroker serve` keeps a journal at a default path in the user's state
directory (docs/durability.md). The tests that start it as a subprocess must
not share one file (a second broker is refused its lock) nor see each other's
jobs, so the suite runs them without a journal unless a test asks for one
(passing `--journal PATH` or setting the variable itself).
"""

from __future__ import annotations

import os

os.environ.setdefault("REASONBROKER_JOURNAL_PATH", "none")
