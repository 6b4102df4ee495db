"""``python -m cli ...`` is ``mess-ai ...``."""

import sys

from cli.main import main

sys.exit(main())
