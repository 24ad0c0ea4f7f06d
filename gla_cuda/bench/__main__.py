"""python -m gla_cuda.bench: the same as gla-bench."""
import sys

from gla_cuda.bench.cli import main

sys.exit(main())
