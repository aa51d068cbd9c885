"""`python -m fastticket ...` is the `fastticket` command."""
import sys

from fastticket.app.cli import main

sys.exit(main())
