"""`python bench/bench_cond_conv2d.py [options]` = `python -m condkernels.bench --suite condconv [options]`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from condkernels.bench import main  # noqa: E402

sys.exit(main(["--suite", "condconv", *sys.argv[1:]]))
