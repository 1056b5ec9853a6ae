"""``python -m experiments.gpu_check``: see :mod:`experiments.gpu_check.main`."""

import sys

from experiments.gpu_check.main import main

sys.exit(main())
