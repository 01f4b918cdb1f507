"""``python -m condkernels.train --help``"""

import sys

from .loop import main

sys.exit(main())
