"""``ditcache calibrate`` as a script, for ``torchrun launch/calibrate.py ...`` (see ditcache/launch/calibrate.py)."""

import sys

from ditcache.launch.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
