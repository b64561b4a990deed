"""Scenario real-model, as `quorum scenario real-model` (quorum/scenarios/library.py).

Usage: python scenarios/real_model.py [--trials N] [--quick] [--clients N]
Needs the llamacpp extra: python3 -m pip install -e '.[llamacpp]'
"""

import sys

from quorum.scenarios import script

if __name__ == "__main__":
    sys.exit(script("real-model"))
