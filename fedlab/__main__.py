"""``python -m fedlab ...``: the installed ``fedserver`` command (the server's commands plus simulate and report)."""
import sys

from fedlab.cli import fedserver_main

sys.exit(fedserver_main())
