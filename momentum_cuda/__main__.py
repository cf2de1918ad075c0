"""`python -m momentum_cuda`: the same as the `momentum-cuda` command."""
import sys

from momentum_cuda.cli import main

sys.exit(main())
