"""``python -m wowlib.report``: see ``wowlib.report.main``."""
import sys

from . import main

sys.exit(main())
