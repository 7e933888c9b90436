"""``python -m tools.model``: see :mod:`tools.model.cli`."""
import sys

from tools.model.cli import main

sys.exit(main())
