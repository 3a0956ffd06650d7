"""``python -m fruitdask``: the CLI entry point."""

from fruitdask.cli import entry

if __name__ == "__main__":
    entry()
