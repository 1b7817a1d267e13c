"""`python -m turbo_export ...` runs the same CLI as `turbo-export ...`."""

from turbo_export.cli import main

main()
