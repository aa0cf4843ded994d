"""``python -m plrd`` (and ``torchrun -m plrd``): the ``plrd`` command."""

import sys

from plrd.cli import main

sys.exit(main())
