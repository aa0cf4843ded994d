"""``python -m plrd`` (and ``torchrun -m plrd``): the ``plrd`` command."""

import sys

from plrd.cli.entry import main

sys.exit(main())
