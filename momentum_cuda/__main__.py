"""`python -m momentum_cuda`: the same as the `momentum-cuda` command."""
import sys

from momentum_cuda.cli import main

if __name__ == "__main__":
    sys.exit(main())
