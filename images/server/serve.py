"""Entrypoint of the Kiln server image: the program is the kiln_server package (images/server/README.md).

``python serve.py --model-uri pvc://models/runs/bert-sst2-int8 --model-name sentiment`` is the same as
``python -m kiln_server ...``; every flag also has an environment variable.
"""

import sys

from kiln_server.app import main

if __name__ == "__main__":
    sys.exit(main())
