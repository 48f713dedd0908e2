"""``python -m dpft.tune``: see `dpft.tune`."""

import sys

from dpft.tune import main

sys.exit(main())
