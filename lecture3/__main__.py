"""`python -m lecture3`: the same as the `lecture3` command."""

import sys

from lecture3.cli import main

sys.exit(main())
