"""Kiln server program: a placeholder until issue 8 brings the real one."""

import sys

if __name__ == "__main__":
    sys.exit("kiln server: not implemented yet (issue 8)")
