"""``python -m metapeft.cli``: the same as the ``metapeft`` script."""

from metapeft.cli import main

main()
