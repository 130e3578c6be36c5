"""``python -m kiln_trainer``: also what torchrun runs (``torchrun ... -m kiln_trainer``)."""

import sys

from .loop import main

sys.exit(main())
