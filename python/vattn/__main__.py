"""`python -m vattn ...` is the `vattn` command."""

import sys

from .cli import main

sys.exit(main())
