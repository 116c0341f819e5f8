"""``python -m benchmarks.debias ...``: the debiasing study's command line (``benchmarks.debias.cli``)."""

import sys

from benchmarks.debias.cli import main

sys.exit(main())
