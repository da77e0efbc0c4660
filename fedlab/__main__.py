"""``python -m fedlab ...``: the installed ``fedserver`` command (the server's commands plus simulate and report);
``python -m fedlab netem ...``: the installed ``netem`` command (shaping plus run, policies and report)."""
import sys

from fedlab.cli import fedserver_main, netem_main

if sys.argv[1:2] == ["netem"]:
    sys.exit(netem_main(sys.argv[2:]))
sys.exit(fedserver_main())
