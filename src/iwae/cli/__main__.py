"""``python -m iwae.cli``: the ``iwae`` command."""

import sys

from iwae.cli import main

sys.exit(main())
