"""`python -m tickstream_stats`: run the stats service with settings from the environment."""

import sys

from tickstream_shared.lifecycle import run_service
from tickstream_stats.service import run

sys.exit(run_service("stats", run))
