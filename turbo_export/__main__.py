"""`python -m turbo_export ...` runs the same CLI as `turbo-export ...`."""

from .cli import main

main()
