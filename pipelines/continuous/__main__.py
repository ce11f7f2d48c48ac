"""``python -m pipelines.continuous``: the same as ``recloop train``."""

import sys

from pipelines.continuous.job import main

sys.exit(main())
