"""Compare greedy generations of a base model and its tuned adapter (not built yet: issue 4)."""

import sys

if __name__ == "__main__":
    sys.exit("eval_compare.py is not built yet: it merges an adapter and compares generations (see the issues).")
