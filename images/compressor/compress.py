"""Kiln compressor program: a placeholder until issue 7 brings the real one."""

import sys

if __name__ == "__main__":
    sys.exit("kiln compressor: not implemented yet (issue 7)")
