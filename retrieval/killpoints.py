"""A test hook that stops a process at a named stage, so that a test can kill it there.

Inert unless the environment variable IMGINDEX_KILLPOINT is set: `reached(stage)` then
returns at once (one dictionary lookup).  With IMGINDEX_KILLPOINT=<stage>, the first time
the process reaches that stage it writes its pid to the file IMGINDEX_KILLPOINT_FILE
(atomically: a reader sees the whole pid or no file) and sleeps until it is killed.  The
kill tests (tests/test_kill_build.py) wait for the file and send SIGKILL, so every kill
hits the stage it names instead of a moment guessed from timings.

Stages (where `imgindex build` calls it):
  reading            the embedding pipeline has read its first record (pipelines.content)
  embedding          the model is about to embed its first batch (pipelines.inference)
  index              an index is built, not saved: .read-* and .imgindex-build-* scratch
  replace <file>     a temporary file holds <file>'s new contents, not renamed yet
                     (retrieval.atomic_files.write_text_atomic; e.g. "replace run_manifest.json",
                     "replace LATEST")
  publishing         the run manifest says "publishing", LATEST is not written yet
  latest-written     LATEST names the run, its manifest still says "publishing"
  retention          retention renamed an old run to runs/.trash-*, not removed yet
"""

from __future__ import annotations

import os
import time

ENV = "IMGINDEX_KILLPOINT"
FILE_ENV = "IMGINDEX_KILLPOINT_FILE"


def reached(stage: str) -> None:
    """Stops here for good when $IMGINDEX_KILLPOINT names `stage` (see the module docstring)."""
    if os.environ.get(ENV) != stage:
        return
    flag = os.environ.get(FILE_ENV)
    if flag:
        tmp = f"{flag}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, flag)
    while True:
        time.sleep(60)
