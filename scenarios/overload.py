"""Scenario overload, the same as `quorum scenario overload` (quorum/scenarios/library.py).

Usage: python scenarios/overload.py [--trials N] [--quick] [--netns] [--target local|compose]
"""

import sys

from quorum.scenarios import script

if __name__ == "__main__":
    sys.exit(script("overload"))
