"""A disk that fills up during a merge: one line naming the directory, an exit code that means "retry later", and a
rerun with space again resumes from the finished shards and gives the same bytes as an uninterrupted merge.

The full disk is a real one: a small tmpfs mounted in a private user and mount namespace (`unshare -rm`), so the
test needs no privileges and leaves nothing mounted behind.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mergebot.dev.synthetic import make_model
from mergebot.errors import ExitCode
from tests.helpers import tree_digest

SHARD_SIZE = "300KB"


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare and a tmpfs mount in a user namespace")
def test_full_disk_is_reported_in_one_line_and_the_rerun_resumes(tmp_path):
    base = make_model(tmp_path / "a", hidden=128, layers=8)
    other = make_model(tmp_path / "b", base=base, seed=1)
    merge = [sys.executable, "-m", "mergebot.cli", "merge", "--method", "linear", f"{base}:0.5", f"{other}:0.5"]
    merge += ["--out-shard-size", SHARD_SIZE]
    reference = tmp_path / "reference"
    subprocess.run([*merge, str(reference)], check=True, capture_output=True)
    output_bytes = sum(p.stat().st_size for p in reference.glob("*.safetensors"))

    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir()
    logs.mkdir()
    out = disk / "out"
    quoted = " ".join(f"'{part}'" for part in merge)
    script = f"""
        mount -t tmpfs -o size={output_bytes // 2} tmpfs {disk}
        {quoted} {out} 2> {logs}/first.err; echo $? > {logs}/first.code
        ls {disk}/.out.partial > {logs}/kept
        mount -o remount,size=64m {disk}
        {quoted} {out} 2> {logs}/second.err; echo $? > {logs}/second.code
        cp -r {out} {tmp_path}/resumed
    """
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, env=os.environ)

    assert int((logs / "first.code").read_text()) == ExitCode.RETRY_LATER
    errors = [line for line in (logs / "first.err").read_text().splitlines() if line.startswith("mergebot: error:")]
    assert len(errors) == 1, (logs / "first.err").read_text()
    assert str(disk / ".out.partial") in errors[0] and "no space left" in errors[0]
    assert "Traceback" not in (logs / "first.err").read_text()
    kept = [name for name in (logs / "kept").read_text().split() if name.endswith(".safetensors")]
    assert kept, "some shards were finished before the disk filled up"

    assert int((logs / "second.code").read_text()) == ExitCode.OK
    summary = next(
        json.loads(line) for line in (logs / "second.err").read_text().splitlines() if '"event": "merged"' in line
    )
    assert summary["reused"] == len(kept)
    assert tree_digest(tmp_path / "resumed") == tree_digest(reference)
