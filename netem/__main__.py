"""``python -m netem``: same as the ``netem`` console script."""
import sys

from netem.cli import main

sys.exit(main())
