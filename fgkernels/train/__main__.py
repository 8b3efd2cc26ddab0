"""``python -m fgkernels.train``: see fgkernels.train.cli."""
import sys

from .cli import main

sys.exit(main())
