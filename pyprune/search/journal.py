"""The candidate cache, kept on disk so that an interrupted compile resumes.

Every measured candidate is appended to a JSON-lines journal as soon as it is
done (flushed and fsynced), keyed by its exact path (:attr:`State.key`). A
search asks the journal before measuring anything, so a candidate is never
measured twice, in one run or across a ``--resume``. The first line holds the
settings that decide the results (model, data, target, levels, budgets that
change training); resuming with other settings is refused rather than mixed.
Fine-tuned weights are saved beside it (pickle-free graph files), because a
later stage may start from them.

Under torchrun only rank 0 writes (``writer``); every process reads, and saving
weights ends at a barrier, so a later read finds the file in every process.

On resume nothing in the folder is trusted: a record cut short by a kill is dropped
and the file rewritten to end on a whole line, so the next record starts on its own
line; a record of the wrong shape or types, or a weights file that will not load, is
skipped with a warning naming the file and line, and that candidate is measured
again. The journal and the weights are read only as regular files of bounded size.
What the search takes from the journal is never the last word: the written model is
measured again (:func:`pyprune.compile.final.write_final`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import fx

from .. import distributed
from ..encode import GraphFormatError, load_graph_module, save_graph_module
from ..files import OutputError, UnsafeFileError, atomic_write, check_regular, read_regular
from .candidates import Candidate

log = logging.getLogger(__name__)

# A record is a few hundred bytes; a compile measures hundreds of candidates.
MAX_JOURNAL_BYTES = 64 << 20
MAX_STATE_BYTES = 8 << 30  # a fine-tuned model's weights, as a graph file


class ResumeMismatch(ValueError):
    """--resume on a journal written with different settings."""


class Journal:
    """Cache of candidates by key; persistent when given a folder."""

    def __init__(self, folder: Path | None = None, fingerprint: dict[str, Any] | None = None,
                 resume: bool = False, writer: bool | None = None) -> None:
        self.folder = folder
        self.writer = distributed.is_main() if writer is None else writer
        self.fingerprint = json.loads(json.dumps(fingerprint or {}))  # normalise tuples to lists
        self._entries: dict[str, Candidate] = {}
        self._from_disk: set[str] = set()
        self.hits = 0
        self.replayed_seconds = 0.0  # time the earlier runs spent on candidates replayed now
        if folder is None:
            return
        path = self.path
        if resume and (path.exists() or path.is_symlink()):
            self._load(path)
        elif self.writer:
            # replaced, never opened: whatever was there (a FIFO would block an open)
            head = (json.dumps({"fingerprint": self.fingerprint}) + "\n").encode()
            atomic_write(path, lambda f: f.write(head), force=True)

    @property
    def path(self) -> Path:
        assert self.folder is not None
        return self.folder / "journal.jsonl"

    def _load(self, path: Path) -> None:
        try:
            data = read_regular(path, MAX_JOURNAL_BYTES)
        except UnsafeFileError as exc:
            raise ResumeMismatch(f"cannot resume: {exc}. Use --force to start over.") from None
        whole, _, cut = data.rpartition(b"\n")
        if cut:  # a kill mid-write: the tail is dropped, so the next record starts on a line of its own
            log.warning("%s: its last line was cut short (%d bytes); dropped, that candidate is measured again",
                        path, len(cut))
            if self.writer:
                with open(path, "r+b") as f:
                    f.truncate(len(whole) + 1 if whole else 0)
        lines = (whole + b"\n").decode("utf-8", errors="replace").splitlines() if whole else []
        try:
            head = json.loads(lines[0]) if lines else {}
        except ValueError:
            head = None
        if not isinstance(head, dict) or not isinstance(head.get("fingerprint"), dict):
            raise ResumeMismatch(f"cannot resume: line 1 of {path} is not the settings record a compile writes. "
                                 "Use --force to start over.")
        if head["fingerprint"] != self.fingerprint:
            old = head["fingerprint"]
            diff = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            raise ResumeMismatch(f"cannot resume: {path} was written with other settings ({', '.join(diff)} "
                                 f"differ). Use the same flags, or --force to start over.")
        for number, line in enumerate(lines[1:], start=2):
            try:
                c = Candidate.from_record(json.loads(line))
            except ValueError as exc:  # not JSON, or not a candidate's record
                log.warning("%s, line %d: %s; skipped, that candidate is measured again", path, number, exc)
                continue
            self._entries[c.key] = c
            self._from_disk.add(c.key)

    def get(self, key: str) -> Candidate | None:
        c = self._entries.get(key)
        if c is not None:
            self.hits += 1
            if key in self._from_disk:
                self._from_disk.discard(key)
                self.replayed_seconds += c.seconds
        return c

    def put(self, candidate: Candidate) -> Candidate:
        self._entries[candidate.key] = candidate
        if self.folder is not None and self.writer:
            line = (json.dumps(candidate.to_dict()) + "\n").encode()
            try:
                with open(self.path, "ab") as f:
                    f.write(line)  # one write of a whole line, flushed to disk before the search goes on
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                raise OutputError(exc.errno, f"cannot write {self.path}: {exc.strerror or exc}") from None
        return candidate

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Candidate]:
        return iter(self._entries.values())

    # -- weights of fine-tuned states

    def _weights_path(self, key: str) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / f"state-{hashlib.sha1(key.encode()).hexdigest()[:20]}.pt"

    def save_weights(self, key: str, gm: fx.GraphModule) -> None:
        path = self._weights_path(key)
        if path is not None:
            if self.writer:
                save_graph_module(gm, path, {"key": key}, force=True)
            distributed.barrier()

    def has_weights(self, key: str) -> bool:
        """Whether weights were saved for ``key`` (:meth:`load_weights` may still refuse them)."""
        path = self._weights_path(key)
        return path is not None and path.exists()

    def load_weights(self, key: str) -> fx.GraphModule | None:
        """The fine-tuned weights saved for ``key``, or None (then the candidate is
        trained again) when they are missing, not a regular file, or will not load."""
        path = self._weights_path(key)
        if path is None or not (path.exists() or path.is_symlink()):
            return None
        try:
            check_regular(path, MAX_STATE_BYTES)
            gm, meta = load_graph_module(path)
        except (UnsafeFileError, GraphFormatError, OSError) as exc:
            log.warning("%s: %s; that candidate is trained again", path, exc)
            return None
        return gm if meta.get("key") == key else None
