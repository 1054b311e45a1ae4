"""A workspace is its owner's alone (#21): a run refuses a folder another user owns or every user may
write (links planted there had a run append its ledger and approvals lines to root's files), and a
new workspace is created 0700 (its data, answers and adapters were readable by every local user)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from preftune.errors import UserError
from preftune.paths import EXAMPLES_DIR
from preftune.workspace import Workspace, check_owned

PREFTUNE = [sys.executable, "-m", "preftune.cli"]


def test_a_new_workspace_is_private_and_an_existing_one_of_yours_is_used(tmp_path):
    ws = Workspace(tmp_path / "a" / "ws").ensure()
    assert ws.root.stat().st_mode & 0o777 == 0o700
    os.chmod(ws.root, 0o755)  # made by the owner, readable by others: theirs to choose, still used
    assert Workspace(ws.root).ensure().root == ws.root


def test_a_workspace_of_another_user_is_refused(tmp_path):
    (tmp_path / "ws").mkdir()
    with pytest.raises(UserError, match=r"belongs to another user \(uid \d+\)") as err:
        check_owned(tmp_path / "ws", me=os.geteuid() + 1)  # as a user who does not own it
    assert str(tmp_path / "ws") in str(err.value)


def test_a_run_refuses_a_workspace_every_user_may_write_and_writes_nothing_there(tmp_path):
    ws = tmp_path / "shared"
    ws.mkdir()
    os.chmod(ws, 0o777)
    (ws / "ledger.jsonl").symlink_to(tmp_path / "someone-elses-file")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path / "ph")}
    proc = subprocess.run(PREFTUNE + ["run", "--dataset", str(EXAMPLES_DIR / "pairs.jsonl"), "--workspace", str(ws),
                                      "--base-model", "tiny-llama", "--yes"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"preftune run: error: {ws}: the workspace is writable by every user (mode 777): they could "
                     "plant files or links in it; `chmod o-w` it, or give another folder"], proc.stderr
    assert sorted(p.name for p in ws.iterdir()) == ["ledger.jsonl"]
    assert not (tmp_path / "someone-elses-file").exists()
    assert json.dumps(lines).count("Traceback") == 0


def test_a_workspace_reached_through_a_folder_every_user_may_change_is_refused(tmp_path):
    """Another user could swap a link or folder there while the run writes (a link repointed after the
    run had checked it, to a folder of their links). /tmp's sticky bit keeps others' hands off."""
    from preftune.workspace import check_path

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(UserError, match=rf"passes through {shared}, which every user may change \(mode 777\)"):
        Workspace(shared / "ws").ensure()
    assert not (shared / "ws").exists()
    os.chmod(shared, 0o1777)  # sticky, as /tmp: only an entry's owner may replace it
    check_path(shared / "ws")


def test_the_workspace_is_its_real_path_resolved_once(tmp_path):
    """A link given as the workspace is followed once; swapping it afterwards moves nothing the run writes."""
    (tmp_path / "real").mkdir()
    (tmp_path / "other").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    ws = Workspace(link).ensure()
    assert ws.root == tmp_path / "real"
    link.unlink()
    link.symlink_to(tmp_path / "other")
    assert ws.ledger.parent == tmp_path / "real"
