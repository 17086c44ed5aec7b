"""`python -m slimserve.cli`: the same entry point as the `slimserve` command."""

import sys

from slimserve.cli import main

sys.exit(main())
