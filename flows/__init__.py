"""Prefect flows that compose the tasks in `tasks/`: the pipeline, its served deployment, the sweep."""

import os

# The temporary server's first start migrates its database; on 2 busy cores that can pass Prefect's
# 20 s default. Set before any flow module imports Prefect; an explicit setting still wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
