"""A full disk during a save: the previous output stays intact, nothing half-written is left, and the
message says what happened. Once on a real, tiny filesystem (a 1 MB tmpfs mounted in a private user
namespace, where the machine allows it), once with ENOSPC simulated at the exact write."""

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QA, write_jsonl

from lmtune.cli import main
from lmtune.config import build_config
from lmtune.outputs import umask
from lmtune.training.train import train


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def adapter(tiny_bloom_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapter")
    data = write_jsonl(root / "qa.jsonl", QA)
    config = build_config(overrides={"model.name_or_path": tiny_bloom_dir, "data.paths": [data],
                                     "train.output_dir": str(root / "adapter"), "train.max_steps": 2})
    train(config, log=lambda _: None)
    return root / "adapter"


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user namespaces to mount a tiny tmpfs")
def test_merge_and_clean_on_a_real_full_filesystem(adapter, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    big = write_jsonl(tmp_path / "big.jsonl", QA * 400)  # ~90 kB of rows to clean
    lmtune = f"{sys.executable} -m lmtune"
    script = f"""
set -u
mount -t tmpfs -o size=1m tmpfs {disk}
{lmtune} merge --adapter {adapter} --output-dir {disk}/merged > /dev/null 2>&1 || exit 11
{lmtune} data clean {big} --output {disk}/clean.jsonl > /dev/null 2>&1 || exit 12
sha256sum {disk}/merged/* {disk}/clean.jsonl > {tmp_path}/before.txt
# Fill the disk, leaving a few kB: less than either output needs.
head -c $(( $(stat -f -c '%a*%S' {disk}) - 16384 )) /dev/zero > {disk}/filler 2>/dev/null
{lmtune} merge --adapter {adapter} --output-dir {disk}/merged --overwrite > {tmp_path}/merge.out 2> {tmp_path}/merge.err
echo $? > {tmp_path}/merge.rc
{lmtune} data clean {big} --output {disk}/clean.jsonl --overwrite > {tmp_path}/clean.out 2> {tmp_path}/clean.err
echo $? > {tmp_path}/clean.rc
sha256sum {disk}/merged/* {disk}/clean.jsonl > {tmp_path}/after.txt
ls -A {disk} > {tmp_path}/listing.txt
"""
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    for step in ("merge", "clean"):
        err = (tmp_path / f"{step}.err").read_text()
        assert (tmp_path / f"{step}.rc").read_text().strip() == "2", err[-2000:]
        assert "no space left on the disk while writing" in err and "is untouched" in err, err[-2000:]
        assert "Traceback" not in err
    # The previous outputs are byte for byte what they were, and no temporary file or folder is left.
    assert (tmp_path / "after.txt").read_text() == (tmp_path / "before.txt").read_text()
    assert sorted((tmp_path / "listing.txt").read_text().split()) == ["clean.jsonl", "clean.rejects.jsonl", "filler", "merged"]


def test_merge_with_the_disk_filling_mid_write_keeps_the_previous_model(adapter, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils as modeling_utils

    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--output-dir", str(out)]) == 0
    before = _digest(out)
    real_save = modeling_utils.safe_save_file

    def save_until_the_disk_is_full(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as f:  # what a full disk leaves: a truncated file, then the error
            f.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(modeling_utils, "safe_save_file", save_until_the_disk_is_full)
    capsys.readouterr()
    assert main(["merge", "--adapter", str(adapter), "--output-dir", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"no space left on the disk while writing {out}" in err and f"the previous {out} is untouched" in err
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary sibling left behind


def _modes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


def test_adapter_and_merged_weights_get_the_users_normal_permissions(adapter, tmp_path, capsys):
    """safetensors writes 0600; on a shared machine the weights must be as readable as the other outputs."""
    modes = _modes(adapter)  # trained under the test run's umask
    mask = umask()
    assert modes["adapter_model.safetensors"] == 0o666 & ~mask
    assert {m for name, m in modes.items() if (adapter / name).is_file()} == {0o666 & ~mask}
    previous = os.umask(0o027)  # a lab that shares with its group only
    try:
        assert main(["merge", "--adapter", str(adapter), "--output-dir", str(tmp_path / "merged")]) == 0, capsys.readouterr().err
    finally:
        os.umask(previous)
    merged = _modes(tmp_path / "merged")
    assert merged["model.safetensors"] == 0o640
    assert {m for name, m in merged.items() if (tmp_path / "merged" / name).is_file()} == {0o640}
    assert merged["."] == 0o750
