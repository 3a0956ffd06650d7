"""``python -m fruitdask.bench TASK WORK PREC REPEAT``: one engine run, in its own process."""

import sys

from fruitdask.bench.children import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
