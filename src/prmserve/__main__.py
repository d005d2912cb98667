"""`python -m prmserve` is the `prmserve` command."""

import sys

from prmserve.cli import main

sys.exit(main())
