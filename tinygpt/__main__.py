"""`python -m tinygpt <command> ...`: the same as the `tinygpt` command, without installing the package."""

from tinygpt.cli import main

main()
