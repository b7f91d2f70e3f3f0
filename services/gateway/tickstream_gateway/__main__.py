"""`python -m tickstream_gateway`: run the gateway with settings from the environment."""

import sys

from tickstream_gateway.service import raise_file_limit, run, tune_gc
from tickstream_shared.lifecycle import run_service

tune_gc()
raise_file_limit()
sys.exit(run_service("gateway", run))
