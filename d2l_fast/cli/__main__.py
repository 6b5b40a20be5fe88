"""``python -m d2l_fast.cli ...``: the ``d2l-fast`` command."""

import sys

from . import main

sys.exit(main())
