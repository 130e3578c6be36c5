"""Entrypoint of the Kiln compressor image: the program is the kiln_compressor package (images/compressor/README.md).

``python compress.py --source-uri ... --output-uri ...`` with the ModelCompression spec in ``KILN_COMPRESSION_SPEC``.
"""

import sys

from kiln_compressor.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
