"""`python -m jaxsft.evaluate`: the evaluate command (jaxsft/evals/cli.py)."""

import sys

from jaxsft.evals.cli import main

if __name__ == "__main__":
    sys.exit(main())
