"""`vbon_ds.bon`, a CONTRACT name users' code and outside tests import: it is the module vbon_ds.core.bon
itself (one module object, so attributes read or patched through either name are the same)."""

import sys

from vbon_ds.core import bon

sys.modules[__name__] = bon
