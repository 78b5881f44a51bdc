"""`python -m tunesmith.cli`: the `tunesmith` command."""

import sys

from tunesmith.cli import main

sys.exit(main())
