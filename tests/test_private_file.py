"""base.private_file: logs and specs only their owner reads."""

import os
import stat

from fedshield.base.private_file import open_private


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_file_is_created_0600(tmp_path):
    path = tmp_path / "run.log"
    with os.fdopen(open_private(path), "w") as f:
        f.write("secret path\n")
    assert _mode(path) == 0o600 and path.read_text() == "secret path\n"


def test_an_existing_wider_file_is_narrowed_and_truncated(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text("an older and longer spec")
    path.chmod(0o644)
    with os.fdopen(open_private(path), "w") as f:
        f.write("{}")
    assert _mode(path) == 0o600 and path.read_text() == "{}"
