"""`python -m turbo_export.cli`: the same command line as `turbo-export`."""

from turbo_export.cli import main

main()
