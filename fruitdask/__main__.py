"""``python -m fruitdask``: the CLI entry point."""

import sys

from fruitdask.cli import main

if __name__ == "__main__":
    sys.exit(main())
