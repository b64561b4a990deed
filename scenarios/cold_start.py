"""Scenario cold-start, the same as `quorum scenario cold-start` (quorum/scenarios/library.py).

Usage: python scenarios/cold_start.py [--trials N] [--quick] [--netns] [--target local|compose]
"""

import sys

from quorum.scenarios import script

if __name__ == "__main__":
    sys.exit(script("cold-start"))
