"""`python -m blocks`: see blocks/setup.py."""

import sys

from blocks.setup import main

sys.exit(main())
