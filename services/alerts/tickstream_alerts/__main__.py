"""`python -m tickstream_alerts`: run the alerts service with settings from the environment."""

import sys

from tickstream_alerts.service import run
from tickstream_shared.lifecycle import run_service

sys.exit(run_service("alerts", run))
