"""`python -m bench.gpu_check`: see the package docstring."""

import sys

from bench.gpu_check.cli import main

sys.exit(main())
