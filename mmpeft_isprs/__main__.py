"""``python -m mmpeft_isprs``: the ``mmpeft-isprs`` command line (works under ``torchrun -m``)."""

import sys

from .cli import main

sys.exit(main())
