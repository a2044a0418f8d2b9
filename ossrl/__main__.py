"""``python -m ossrl`` and ``torchrun [--nproc-per-node N ...] -m ossrl train CONFIG overrides``."""

import sys

from ossrl.cli import main

if __name__ == "__main__":
    sys.exit(main())
