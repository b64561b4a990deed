"""Scenario flapping, the same as `quorum scenario flapping` (quorum/scenarios/library.py).

Usage: python scenarios/flapping.py [--trials N] [--quick] [--netns] [--target local|compose]
"""

import sys

from quorum.scenarios import script

if __name__ == "__main__":
    sys.exit(script("flapping"))
