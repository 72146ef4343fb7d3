"""``ditcache generate`` as a script, for ``torchrun launch/generate.py ...`` (see ditcache/launch/generate.py)."""

import sys

from ditcache.launch.generate import main

if __name__ == "__main__":
    sys.exit(main())
