"""``ditcache ray-generate`` as a script, for ``python launch/ray_generate.py ...`` (see ditcache/launch/ray_generate.py)."""

import sys

from ditcache.launch.ray_generate import main

if __name__ == "__main__":
    sys.exit(main())
