"""``python -m tools.evaluate``: see :mod:`tools.evaluate.cli`."""
import sys

from tools.evaluate.cli import main

sys.exit(main())
