"""The run's workspace: every phase's output is a file here, so a re-run resumes.

Layout (docs/ARCHITECTURE.md says which phase writes each):
    inspection.json, data/train.jsonl, data/test.jsonl      phase 1
    plan.json, approvals.jsonl                                phase 2
    pairs/pairs-<UTC>.jsonl, pairs/provenance.json            phase 3
    jobs/<job-id>/{adapter/, metrics.jsonl, summary.json}     phase 4
    refcache/                                                 phase 4 (shared reference log-probs)
    eval/                                                     phase 5
    deploy/endpoint.json                                      phase 6
    final_report.md, figures/                                 phase 7
    ledger.jsonl                                              phases 3 and 5 (every paid request)
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from preftune.errors import UserError
from preftune.job import SUMMARY_FILE

WORKSPACES = "workspaces"  # default parent of every workspace, under the directory preftune runs in


def short_name(model: str | Path) -> str:
    """A model's short name: its folder's last part (`/models/Qwen2.5-1.5B/` → `Qwen2.5-1.5B`),
    made safe for file and job names. Used for job ids, eval folders, drops and reports."""
    text = str(model).rstrip("/")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(text).name or text)


def default_workspace(name: str) -> Path:
    """`./workspaces/<name>` (absolute): where a command writes when no --workspace is given."""
    return Path.cwd() / WORKSPACES / name


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def checked(self) -> Workspace:
        """The workspace at its real path, resolved once (a link swapped later changes nothing), after
        ``check_path``; an existing folder must be this user's alone (``check_owned``)."""
        check_path(self.root)
        ws = Workspace(self.root.resolve())
        if ws.root.is_dir():
            check_owned(ws.root)
        return ws

    def ensure(self) -> Workspace:
        """``checked``, its folder created 0700 when missing (its data, answers, adapters and ledger
        are its owner's)."""
        ws = self.checked()
        try:
            ws.root.mkdir(parents=True, mode=0o700)
        except FileExistsError:  # there already, or made since `checked` looked: whose is it?
            check_owned(ws.root)
        return ws

    @property
    def lock(self) -> Path:
        """Held by the one live run of this workspace (preftune.files.exclusive)."""
        return self.root / ".preftune.lock"

    @property
    def inspection(self) -> Path:
        return self.root / "inspection.json"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def train_data(self) -> Path:
        return self.data_dir / "train.jsonl"

    @property
    def test_data(self) -> Path:
        return self.data_dir / "test.jsonl"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def approvals(self) -> Path:
        return self.root / "approvals.jsonl"

    @property
    def pairs_dir(self) -> Path:
        return self.root / "pairs"

    @property
    def pairs_done(self) -> Path:
        """Written when pair generation and its split finished: the train/test pair files."""
        return self.pairs_dir / "done.json"

    @property
    def train_pairs(self) -> Path:
        return self.data_dir / "train_pairs.jsonl"

    @property
    def test_pairs(self) -> Path:
        return self.data_dir / "test_pairs.jsonl"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def job_config(self, job_id: str) -> Path:
        """The job's TrainConfig, written by the sweep, read by `preftune train --config`."""
        return self.job_dir(job_id) / "job.json"

    def job_summary(self, job_id: str) -> Path:
        """Written last by the trainer: its presence (with the config hash) means the job is done."""
        return self.job_dir(job_id) / SUMMARY_FILE

    @property
    def sweep_results(self) -> Path:
        return self.jobs_dir / "sweep.json"

    @property
    def refcache(self) -> Path:
        return self.root / "refcache"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_base_dir(self, base_model: str) -> Path:
        """Evaluation of one base model and its candidates."""
        return self.eval_dir / short_name(base_model)

    @property
    def scores(self) -> Path:
        return self.eval_dir / "scores.json"

    @property
    def deploy_dir(self) -> Path:
        return self.root / "deploy"

    @property
    def endpoint(self) -> Path:
        """The deployed endpoint: URL, model, pid, smoke test; `deploy --stop` reads it."""
        return self.deploy_dir / "endpoint.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def ledger(self) -> Path:
        """The cost ledger: one line per paid request, appended when paid (preftune/ledger.py)."""
        return self.root / "ledger.jsonl"

    @property
    def run_record(self) -> Path:
        """Which flow run and spec produced this workspace."""
        return self.root / "run.json"

    @property
    def outcome(self) -> Path:
        return self.root / "outcome.json"

    @property
    def report(self) -> Path:
        return self.root / "final_report.md"

    @property
    def figures(self) -> Path:
        return self.root / "figures"


def check_owned(root: Path, me: int | None = None) -> None:
    """Refuse (one line) a workspace another user owns or anyone may write: its owner or any local user
    could plant a link there (a run appended its ledger and approvals lines to a file of root's
    through links a second user had made) or a forged file. ``me``: the user to check for."""
    st = os.stat(root)
    me = os.geteuid() if me is None else me
    if st.st_uid != me:
        raise UserError(f"the workspace belongs to another user (uid {st.st_uid}): files or links they put "
                        "there would be written through or believed; give a folder of your own", path=root)
    if st.st_mode & stat.S_IWOTH:
        raise UserError(f"the workspace is writable by every user (mode {stat.S_IMODE(st.st_mode):o}): they "
                        "could plant files or links in it; `chmod o-w` it, or give another folder", path=root)


def check_path(root: Path, me: int | None = None) -> None:
    """Refuse (one line) a workspace reached through a folder or link that another user owns, or a
    folder every user may change (not sticky, as /tmp is): they could swap what the path leads to
    while the run writes (a link of another user's was repointed, once the run had checked it, to a
    folder of their links). Root's own folders and links are trusted."""
    me = os.geteuid() if me is None else me
    path = Path(os.path.abspath(root))
    for part in [*reversed(path.parents), path]:
        try:
            st = os.lstat(part)
        except FileNotFoundError:
            return  # the rest is created by this run, 0700
        if part == path and not stat.S_ISLNK(st.st_mode):
            return  # the folder itself: check_owned says what is wrong with it
        if st.st_uid not in (me, 0):
            raise UserError(f"the way to the workspace passes through {part}, which another user (uid "
                            f"{st.st_uid}) owns: they could swap where it leads; give a folder of your own",
                            path=root)
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise UserError(f"the way to the workspace passes through {part}, which every user may change "
                            f"(mode {stat.S_IMODE(st.st_mode):o}): give a folder of your own", path=root)


def in_use_message(root: Path, holder: dict) -> str:
    """One line naming the live run that holds a workspace."""
    who = ", ".join(f"{k} {v}" for k, v in (("pid", holder.get("pid")), ("flow run", holder.get("flow_run_id")),
                                            ("since", holder.get("since"))) if v)
    return (f"workspace {root} is in use by another run ({who or 'holder unknown'}): wait for it to end, "
            "or give another --workspace")
