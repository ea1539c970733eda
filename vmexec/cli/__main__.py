"""``python -m vmexec.cli``: the ``vmexec`` command."""

import sys

from vmexec.cli import main

sys.exit(main())
