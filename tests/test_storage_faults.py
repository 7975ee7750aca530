"""Faults at rest (issue 15, item 9): a full disk, a read-only directory or an I/O error while
writing key files, checkpoints, metrics.json or adapters raises fs.StorageError naming the
path, and leaves the previous files as they were (no half-written file, no temp file).

Tests run as root, which a chmod-ed directory does not stop: faults come from an injector in
the os calls of fedshield.base.atomic's paths (and open() for libraries writing into a directory),
and, where this process may mount one, from a real tiny tmpfs (full, then read-only).
"""

from __future__ import annotations

import builtins
import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch

import fedshield as fs
from fedshield.run.checkpoint import load_checkpoint, save_checkpoint
from fedshield.config import ModelConfig
from fedshield.fl.record import RunRecord
from fedshield.data.tokenize import build_tokenizer
from fedshield.config import LoraConfig
from fedshield.training.adapter_io import save_adapter
from fedshield.training.base_model import build_tiny_llama
from fedshield.training.lora import attach_lora, get_lora_state, set_lora_state


class FaultyDisk:
    """Fails the calls that write under ``root`` once armed, as a disk would."""

    def __init__(self, monkeypatch, root: Path, fault: str) -> None:
        self.root, self.fault, self.armed, self.hits = str(root), fault, False, 0
        real = {name: getattr(os, name) for name in ("open", "write", "fsync", "replace",
                                                      "rename", "mkdir")}
        real_open = builtins.open

        def under(path) -> bool:
            try:
                return os.path.abspath(os.fspath(path)).startswith(self.root)
            except TypeError:
                return False

        def fd_under(fd: int) -> bool:
            try:
                return os.readlink(f"/proc/self/fd/{fd}").startswith(self.root)
            except OSError:
                return False

        def fail(code: int, path) -> None:
            self.hits += 1
            raise OSError(code, os.strerror(code), os.fspath(path))

        def os_open(path, flags, *args, **kw):
            if self.armed and under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                if self.fault == "read-only":
                    fail(errno.EROFS, path)
            return real["open"](path, flags, *args, **kw)

        def os_write(fd, data):
            if self.armed and self.fault == "disk-full" and fd_under(fd):
                written = real["write"](fd, bytes(memoryview(data)[:len(data) // 2]))
                if written:  # part of it made it to the disk, then no space was left
                    return written
                fail(errno.ENOSPC, f"fd {fd}")
            return real["write"](fd, data)

        def os_fsync(fd):
            if self.armed and self.fault == "io-error" and fd_under(fd):
                fail(errno.EIO, f"fd {fd}")
            return real["fsync"](fd)

        def renamer(name):
            def rename(src, dst, *args, **kw):
                if self.armed and self.fault == "rename" and under(dst):
                    fail(errno.EXDEV, dst)
                return real[name](src, dst, *args, **kw)
            return rename

        def os_mkdir(path, *args, **kw):  # an existing directory: EEXIST first, as Linux does
            if (self.armed and self.fault == "read-only" and under(path) and
                    not os.path.exists(path)):
                fail(errno.EROFS, path)
            return real["mkdir"](path, *args, **kw)

        def b_open(file, mode="r", *args, **kw):
            if self.armed and under(file) and any(c in mode for c in "wax+"):
                if self.fault == "read-only":
                    fail(errno.EROFS, file)
                if self.fault == "disk-full":
                    fail(errno.ENOSPC, file)
            return real_open(file, mode, *args, **kw)

        for name, fn in (("open", os_open), ("write", os_write), ("fsync", os_fsync),
                         ("replace", renamer("replace")), ("rename", renamer("rename")),
                         ("mkdir", os_mkdir)):
            monkeypatch.setattr(os, name, fn)
        monkeypatch.setattr(builtins, "open", b_open)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _tiny_lora(value: float):
    tokenizer = build_tokenizer()
    model = attach_lora(build_tiny_llama(len(tokenizer), seed=0), LoraConfig(r=4, alpha=8),
                        seed=0)
    set_lora_state(model, {k: torch.full_like(v, value) for k, v in get_lora_state(model).items()})
    return model, tokenizer


def write_key_file(out: Path, version: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    ctx = KEYS[0] if version == 1 else KEYS[1]  # the client context first, then the public one
    ctx.save(out / "party.key")
    return out / "party.key"


def write_metrics(out: Path, version: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    RunRecord(config={"version": version}, engine="local").write(out / "metrics.json")
    return out / "metrics.json"


def write_checkpoint(out: Path, version: int) -> Path:
    return save_checkpoint(out, round_idx=version, state={"w": torch.full((64,), version)},
                           metrics={"rounds": [{"round": r} for r in range(1, version + 1)]},
                           config={"version": version})


def write_adapter(out: Path, version: int) -> Path:
    model, tokenizer = _tiny_lora(version)
    save_adapter(model, tokenizer, out, ModelConfig(), seed=0)
    return out / "adapter"


KEYS: list = []
WRITERS = {"key file": write_key_file, "metrics": write_metrics, "checkpoint": write_checkpoint,
           "adapter": write_adapter}
FAULTS = ["disk-full", "read-only", "io-error", "rename"]


@pytest.fixture(scope="module", autouse=True)
def _keys():
    keys = fs.keygen_shared()
    KEYS[:] = [keys.client_context(), keys.server_context()]
    yield
    KEYS.clear()


def _check_previous_intact(what: str, out: Path, before: dict) -> None:
    assert snapshot(out) == before, f"{what}: files changed or left behind"
    if what == "key file":
        assert fs.load_context(out / "party.key").has_secret_key
    elif what == "checkpoint":
        assert load_checkpoint(out)["round"] == 1
    elif what == "adapter":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"),
                                  out / "adapter")


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("what", list(WRITERS))
def test_a_failed_write_names_the_path_and_keeps_the_previous_files(tmp_path, monkeypatch,
                                                                   what, fault):
    disk = FaultyDisk(monkeypatch, tmp_path, fault)
    out = tmp_path / "run"
    WRITERS[what](out, 1)
    before = snapshot(out)
    disk.armed = True
    with pytest.raises(fs.StorageError) as info:
        WRITERS[what](out, 2)
    disk.armed = False
    assert disk.hits >= 1
    assert isinstance(info.value, OSError) and isinstance(info.value, fs.FedShieldError)
    message = str(info.value)
    assert str(out) in message and "previous version is unchanged" in message \
        or "cannot create" in message, message
    assert os.strerror({"disk-full": errno.ENOSPC, "read-only": errno.EROFS,
                        "io-error": errno.EIO, "rename": errno.EXDEV}[fault]) in message
    _check_previous_intact(what, out, before)
    WRITERS[what](out, 2)  # the fault gone, the next write goes through
    assert snapshot(out) != before


# -- a real full disk and a real read-only mount, where this process may mount a tmpfs -------

@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def test_a_real_full_then_read_only_disk(tiny_tmpfs):
    out = tiny_tmpfs / "run"
    for what in ("key file", "metrics", "checkpoint"):
        WRITERS[what](out, 1)
    before = snapshot(out)
    filler = tiny_tmpfs / "filler"
    with builtins.open(filler, "wb") as fh:  # fill the disk to its last byte
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    for what in ("key file", "metrics", "checkpoint"):
        with pytest.raises(fs.StorageError, match="No space left on device"):
            WRITERS[what](out, 2)
        _check_previous_intact(what, out, before)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True, timeout=30)
    for what in ("key file", "metrics", "checkpoint"):
        with pytest.raises(fs.StorageError, match="Read-only file system"):
            WRITERS[what](out, 2)
        _check_previous_intact(what, out, before)
