"""``python -m fruitdask.bench TASK WORK PREC REPEAT``: one engine run, in its own process."""

import sys

from fruitdask.bench.children import PIPELINE_TASKS, main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    if sys.argv[1] in PIPELINE_TASKS:  # a pipeline engine leaves as `fruitdask run` does
        from fruitdask.commands.startup import exit_quickly

        exit_quickly(code)
    sys.exit(code)  # raw: a plain script's exit
