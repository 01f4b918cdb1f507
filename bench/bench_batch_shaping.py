"""`python bench/bench_batch_shaping.py [options]` = `python -m condkernels.bench --suite batch_shaping [options]`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from condkernels.bench import main  # noqa: E402

sys.exit(main(["--suite", "batch_shaping", *sys.argv[1:]]))
