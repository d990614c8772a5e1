"""The on-disk model repository: one folder per model, one numbered sub-folder per version.

    repo/
      breast_cancer/
        config.yaml
        1/model.onnx
        2/model.onnx

Names and paths are confined to the repository: folder names must be plain names, and
anything that resolves outside the repository (a symlink out of it) is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fastserve.config import MODEL_CONFIG_FILE

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
