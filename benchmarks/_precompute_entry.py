"""torchrun entry for benchmarks/precompute_throughput.py: runs ``analysis.precompute.main`` with the
arguments in $MOESCOPE_PRECOMPUTE_ARGS (JSON list).

torch 2.14's torchrun parses ``--run`` after ``-m analysis.precompute`` as an abbreviation of its own
``--run-path`` ("ambiguous option"), so the documented ``torchrun ... -m analysis.precompute --run NAME``
fails; passing the arguments through the environment sidesteps that."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.precompute import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(json.loads(os.environ["MOESCOPE_PRECOMPUTE_ARGS"])))
