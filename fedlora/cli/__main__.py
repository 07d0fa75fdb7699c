"""`python -m fedlora.cli`: the same as the `fedlora` command."""

from fedlora.cli import main

main()
