"""snapbench: the pieces of ``benchmarks/bench.py``, one concept per module.

* :mod:`.workloads` — the state dicts saved (builders, the "optimizer step", tree walks);
* :mod:`.contenders` — every writer behind one adapter interface;
* :mod:`.memory` — process-tree PSS and its peak sampler;
* :mod:`.metrics` — the training loop and the cold / warm save measurements;
* :mod:`.isolation` — running one case forked, in a fresh interpreter or in-process;
* :mod:`.report` — summaries, sweep fits and the markdown tables (``--compare`` included);
* :mod:`.targets` — the verdicts;
* :mod:`.meta` — versions, machine and git description;
* :mod:`.cli` — the command line and the driver.
"""

from __future__ import annotations

import os

MiB = 1 << 20
GiB = 1 << 30
#: The repository root (``benchmarks/`` lives under it).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: The writer the original targets are about.
DEFAULT_WRITER = "snap.Standard"
