"""`python -m napari_ctcolor` is the `ctcolor` command."""

import sys

from .cli import main

sys.exit(main())
