"""`python -m tickstream_watcher`: run the watcher with settings from the environment."""

import sys

from tickstream_shared.lifecycle import run_service
from tickstream_watcher.service import run

sys.exit(run_service("watcher", run))
