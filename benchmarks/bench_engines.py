"""GPU benchmark of dtq's engines: see ``dtq.tools.bench_engines`` (also installed as ``dtq-bench``).

    pip install -e .   # once, in the repository
    python benchmarks/bench_engines.py --out docs/results/bench_engines.json
"""

import sys

from dtq.tools.bench_engines import main

if __name__ == "__main__":
    sys.exit(main())
