"""Scenario rolling-restart, as `quorum scenario rolling-restart` (quorum/scenarios/library.py).

Usage: python scenarios/rolling_restart.py [--trials N] [--quick] [--netns] [--target local|compose]
"""

import sys

from quorum.scenarios import script

if __name__ == "__main__":
    sys.exit(script("rolling-restart"))
