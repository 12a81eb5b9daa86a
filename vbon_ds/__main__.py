"""`python -m vbon_ds` is the `vbon` command."""

import sys

from vbon_ds.cli import main

sys.exit(main())
