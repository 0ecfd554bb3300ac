"""`python -m helip ...` (what torchrun launches) is the `helip` command."""
import sys

from .app.cli import main

sys.exit(main())
