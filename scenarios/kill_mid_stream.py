"""Scenario kill-mid-stream, as `quorum scenario kill-mid-stream` (quorum/scenarios/library.py).

Usage: python scenarios/kill_mid_stream.py [--trials N] [--quick] [--netns] [--target local|compose]
"""

import sys

from quorum.scenarios import script

if __name__ == "__main__":
    sys.exit(script("kill-mid-stream"))
