"""Where the shared photo sets with ground truth live (../shared/data, see its README).

Tests that use them skip with a reason when the directory is absent; never copy it into the project.
"""

import os

SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data"))
