"""Scenario graceful-drain, as `quorum scenario graceful-drain` (quorum/scenarios/library.py).

Usage: python scenarios/graceful_drain.py [--trials N] [--quick] [--netns] [--target local|compose]
"""

import sys

from quorum.scenarios import script

if __name__ == "__main__":
    sys.exit(script("graceful-drain"))
