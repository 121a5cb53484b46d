"""One measurement in a fresh process: ``python -m benchmarks.child NAME SIDE [--quick]``.

SIDE is ``kitsnet``, ``peer`` or ``check``; prints one JSON line (see ``harness.child_measure``).
"""

from __future__ import annotations

import json
import os
import sys

from benchmarks.harness import child_measure

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quick"]
    print(json.dumps(child_measure(args[0], args[1], "--quick" in sys.argv[1:])), flush=True)
    sys.stderr.flush()
    os._exit(0)  # a worker thread that never ends must not keep the child alive
