"""`python -m pocketlm`: the same as the `pocketlm` command."""
from .cli import main

main()
