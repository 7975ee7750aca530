"""A ClientApp that must never run on a site with fedshield's executor: importing it leaves
a marker file (tests/test_site_executor.py ships it in the app package as the server's code)."""

import os
from pathlib import Path

from flwr.clientapp import ClientApp

Path(os.environ["FEDSHIELD_TEST_MARKER"]).write_text("the server's ClientApp ran\n")
app = ClientApp()
