"""``python -m brainshift``: the same command line as the ``brainshift`` console script."""

from brainshift.cli import main

main()
