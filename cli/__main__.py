"""`python -m cli` runs the `moe` command."""

import sys

from cli.main import main

sys.exit(main())
