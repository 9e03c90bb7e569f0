"""Side-by-side CPU benchmark of bamba against transformers; see `bamba.bench` for what it measures.

    python benchmarks/bench.py --threads 2 [--quick] [--long] [--variants fp32,bf16,int8,int4] [--json out.json]

The same as `bamba bench`. The first run creates `.bench/bench-small` (random weights) and its int8 / int4
quantized copies; later runs reuse them.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from bamba.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
