"""``python -m kiln_server``: the program of the server image."""

import sys

from .app import main

sys.exit(main())
