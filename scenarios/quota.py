"""Scenario quota, the same as `quorum scenario quota` (quorum/scenarios/library.py).

Usage: python scenarios/quota.py [--trials N] [--quick] [--netns] [--target local|compose]
"""

import sys

from quorum.scenarios import script

if __name__ == "__main__":
    sys.exit(script("quota"))
