"""``python -m kiln_compressor``."""

import sys

from .pipeline import main

sys.exit(main())
