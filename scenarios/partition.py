"""Scenario partition, the same as `quorum scenario partition` (quorum/scenarios/library.py).

Usage: python scenarios/partition.py [--trials N] [--quick] [--netns] [--target local|compose]
"""

import sys

from quorum.scenarios import script

if __name__ == "__main__":
    sys.exit(script("partition"))
