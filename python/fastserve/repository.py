"""The on-disk model repository: one folder per model, one numbered sub-folder per version.

    repo/
      breast_cancer/
        config.yaml
        1/model.onnx
        2/model.onnx

Names and paths are confined to the repository: folder names must be plain names, and
anything that resolves outside the repository (a symlink out of it) is refused.

``watch`` reports which model folders changed: from filesystem events (watchfiles) where
the platform gives them, else by polling; bursts of edits are grouped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastserve.config import MODEL_CONFIG_FILE

log = logging.getLogger("fastserve.repository")

MODEL_FILE = "model.onnx"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_VERSION = re.compile(r"[1-9][0-9]{0,17}")


def is_model_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None and ".." not in name


def is_version_name(name: str) -> bool:
    return _VERSION.fullmatch(name) is not None


@dataclass(frozen=True)
class ModelSource:
    """A model folder found in the repository."""

    name: str
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / MODEL_CONFIG_FILE

    def versions(self) -> list[str]:
        """Version folders holding a model file, oldest first, confined to the model folder."""
        found: list[int] = []
        for child in self.path.iterdir():
            if not is_version_name(child.name) or not child.is_dir():
                continue
            if not _inside(child, self.path) or not (child / MODEL_FILE).is_file():
                continue
            found.append(int(child.name))
        return [str(v) for v in sorted(found)]

    def model_file(self, version: str) -> Path:
        return self.path / version / MODEL_FILE

    def fingerprint(self, version: str) -> tuple[tuple[str, int, int, int], ...]:
        """What a version folder's files are now (name, size, mtime, inode): a changed
        fingerprint means the version must be loaded again."""
        folder = self.path / version
        found = []
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except OSError:
                    continue
                found.append((str(path.relative_to(folder)), st.st_size, st.st_mtime_ns, st.st_ino))
        return tuple(sorted(found))


def find(root: Path, name: str) -> ModelSource | None:
    """The model folder ``name`` of the repository, or None when there is no such model.

    ``name`` comes from a client: it must be a plain model name, and the folder must
    resolve inside the repository and hold a config file.
    """
    if not is_model_name(name):
        return None
    path = root / name
    if not path.is_dir() or not _inside(path, root) or not (path / MODEL_CONFIG_FILE).is_file():
        return None
    return ModelSource(name, path)


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def scan(root: Path) -> tuple[list[ModelSource], dict[str, str]]:
    """Model folders under ``root`` and, by folder name, why others were skipped."""
    sources: list[ModelSource] = []
    skipped: dict[str, str] = {}
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        if not is_model_name(child.name):
            skipped[child.name[:64]] = "not a valid model name"
        elif not _inside(child, root):
            skipped[child.name] = "resolves outside the model repository"
        elif not (child / MODEL_CONFIG_FILE).is_file():
            skipped[child.name] = f"no {MODEL_CONFIG_FILE}"
        else:
            sources.append(ModelSource(child.name, child))
    return sources, skipped


WatchMode = Literal["events", "poll"]


async def watch(
    root: Path,
    mode: WatchMode = "events",
    *,
    debounce_ms: int = 100,
    poll_interval_s: float = 0.5,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[set[str]]:
    """Yield the names of the top-level folders of ``root`` that changed, one set per burst.

    ``events`` uses the platform's filesystem notifications and falls back to polling
    when they cannot be set up (no inotify watches left, some network filesystems).
    """
    from watchfiles import awatch

    root = root.resolve()  # noqa: ASYNC240 - once, before watching
    force_polling = mode == "poll"
    while True:
        try:
            async for changes in awatch(
                root,
                step=debounce_ms,
                debounce=max(2000, 4 * debounce_ms),
                force_polling=force_polling,
                poll_delay_ms=int(poll_interval_s * 1000),
                stop_event=stop,
                ignore_permission_denied=True,
                recursive=True,
            ):
                names = {_top_folder(root, path) for _change, path in changes}
                names.discard("")
                if names:
                    yield names
            return
        except (OSError, RuntimeError) as exc:
            if force_polling:
                raise
            log.warning("filesystem events unavailable (%s); polling %s instead", exc, root)
            force_polling = True


def _top_folder(root: Path, path: str) -> str:
    try:
        relative = Path(path).relative_to(root)
    except ValueError:
        return ""
    return relative.parts[0] if relative.parts else ""
