"""Kiln trainer program: a placeholder until issue 5 brings the real one."""

import sys

if __name__ == "__main__":
    sys.exit("kiln trainer: not implemented yet (issue 5)")
