import os
import sys

# Make sure the `dtq` package imported by the tests is this checkout, when run via PYTHONPATH.
os.environ.setdefault("OMP_NUM_THREADS", "2")
