"""``python -m vmexec``: the ``vmexec`` command (``vmexec.cli``), as the console script."""

import sys

from vmexec.cli import main

sys.exit(main())
