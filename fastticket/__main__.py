"""`python -m fastticket ...` is the `fastticket` command."""
import sys

from fastticket.cli import main

sys.exit(main())
