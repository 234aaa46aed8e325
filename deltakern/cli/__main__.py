"""``python -m deltakern.cli``: the ``deltakern`` command line."""

import sys

from deltakern.cli.main import main

sys.exit(main())
