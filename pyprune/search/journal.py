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
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import fx

from .. import distributed
from ..encode import load_graph_module, save_graph_module
from .candidates import Candidate


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
        if resume and path.is_file():
            self._load(path)
        elif self.writer:
            folder.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")

    @property
    def path(self) -> Path:
        assert self.folder is not None
        return self.folder / "journal.jsonl"

    def _load(self, path: Path) -> None:
        lines = path.read_text().splitlines()
        head = json.loads(lines[0]) if lines else {}
        if head.get("fingerprint") != self.fingerprint:
            old = head.get("fingerprint", {})
            diff = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            raise ResumeMismatch(f"cannot resume: {path} was written with other settings ({', '.join(diff)} "
                                 f"differ). Use the same flags, or --force to start over.")
        for line in lines[1:]:
            try:
                c = Candidate.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue  # the last line of a killed run may be cut short
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
            with open(self.path, "a") as f:
                f.write(json.dumps(candidate.to_dict()) + "\n")
                f.flush()
                os.fsync(f.fileno())
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

    def load_weights(self, key: str) -> fx.GraphModule | None:
        path = self._weights_path(key)
        if path is None or not path.is_file():
            return None
        gm, meta = load_graph_module(path)
        return gm if meta.get("key") == key else None
