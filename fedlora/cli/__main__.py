"""`python -m fedlora.cli`: the same as the `fedlora` command, exit code included."""

from fedlora.cli import main

raise SystemExit(main())
