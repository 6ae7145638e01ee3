"""The compiled artifact on disk: what ``save_pretrained`` writes and ``from_pretrained`` reads.

A saved model is one folder:

==============================  =================================================================
``config.json``                 the transformers configuration (labels, sizes)
tokenizer files                 ``tokenizer.json``, ``tokenizer_config.json``... when the model was
                                loaded with a tokenizer
``disc_program.json``           the compiled program (kernel calls, buffers, tuned GEMM choices)
``disc_weights.safetensors``    the program's weights
``disc_settings.json``          the compiler settings (:class:`~optimum_disc.DiscSettings`)
``disc_manifest.json``          format version, task, versions of optimum-disc / torch / triton /
                                transformers, the device it was compiled on (GPU architecture or
                                ``"cpu"``), the coverage report, and the size and sha256 of every
                                other file of the folder
==============================  =================================================================

Saving is atomic: everything is written into a temporary folder beside the target, which then
replaces the target, so a save that fails half-way leaves the previous folder as it was.

Loading reads JSON and safetensors only (no pickle, no code from the folder), checks every file
against the manifest, and refuses an artifact of another format version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from optimum_disc.compiler.program import FORMAT_VERSION as PROGRAM_FORMAT_VERSION
from optimum_disc.compiler.program import Program
from optimum_disc.settings import DiscSettings

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = "optimum-disc"
ARTIFACT_FORMAT_VERSION = 1

CONFIG_NAME = "config.json"
MANIFEST_NAME = "disc_manifest.json"
PROGRAM_NAME = "disc_program.json"
WEIGHTS_NAME = "disc_weights.safetensors"
SETTINGS_NAME = "disc_settings.json"
COMPILED_FILES = (PROGRAM_NAME, WEIGHTS_NAME, SETTINGS_NAME)
REQUIRED_FILES = (CONFIG_NAME, *COMPILED_FILES)

_CHUNK = 1 << 20


class ArtifactNotFoundError(FileNotFoundError):
    """The folder holds no compiled artifact (no ``disc_manifest.json``)."""


@dataclass
class Artifact:
    """A verified artifact folder, read back."""

    directory: Path
    manifest: dict
    program: Program
    settings: DiscSettings

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def coverage(self) -> dict:
        return self.manifest.get("coverage") or {}

    @property
    def compiled_on(self) -> dict:
        return self.manifest.get("device") or {}


# -- environment ----------------------------------------------------------------------------


def device_info(device: str | torch.device) -> dict:
    """The device a program was compiled and tuned for: type, name, compute capability."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(index),
            "compute_capability": f"{major}.{minor}",
        }
    return {"type": device.type, "name": device.type, "compute_capability": device.type}


def versions() -> dict:
    """Versions of the packages that shape a compiled program."""
    import transformers
    import triton

    from optimum_disc import __version__

    return {
        "optimum_disc": __version__,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
    }


# -- writing --------------------------------------------------------------------------------


def write_compiled_files(directory: str | os.PathLike, program: Program, settings) -> None:
    """Write the program, its weights and the settings into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    # Own, contiguous CPU copies: safetensors refuses tensors that share memory (tied weights).
    weights = {
        name: t.detach().to("cpu", copy=True).contiguous() for name, t in program.weights.items()
    }
    (directory / PROGRAM_NAME).write_text(program.to_json())
    save_file(weights, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / SETTINGS_NAME).write_text(json.dumps(settings.to_dict(), indent=1, sort_keys=True))


def save_artifact(
    save_directory: str | os.PathLike,
    write_files: Callable[[Path], None],
    *,
    task: str,
    model_class: str,
    device: str | torch.device,
    coverage: dict | None = None,
) -> Path:
    """Atomically (re)place ``save_directory`` with an artifact.

    ``write_files(tmp)`` writes the config, the preprocessors and the compiled files into a
    temporary folder beside the target; the manifest (hashes of every file) is written last,
    then the temporary folder replaces the target. If anything fails before the swap, the
    temporary folder is removed and the target is left as it was.
    """
    target = Path(save_directory).absolute()
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        write_files(tmp)
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            name = path.relative_to(tmp).as_posix()
            files[name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        missing = [name for name in REQUIRED_FILES if name not in files]
        if missing:
            raise RuntimeError(f"the artifact is incomplete: {missing} were not written")
        manifest = {
            "format": ARTIFACT_FORMAT,
            "format_version": ARTIFACT_FORMAT_VERSION,
            "program_format_version": PROGRAM_FORMAT_VERSION,
            "task": task,
            "model_class": model_class,
            "versions": versions(),
            "device": device_info(device),
            "coverage": coverage or {},
            "files": files,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        mode = stat.S_IMODE(target.stat().st_mode) if target.is_dir() else _default_dir_mode()
        os.chmod(tmp, mode)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, target)
    return target


def _check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_directory {str(target)!r} is a file; pass a folder path.")
    if target.is_dir() and not (target / MANIFEST_NAME).is_file():
        others = sorted(p.name for p in target.iterdir())
        if others:
            raise ValueError(
                f"save_directory {str(target)!r} already holds files that are not an optimum-disc "
                f"artifact ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); saving "
                "replaces the whole folder, so choose a new or empty folder."
            )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system or the file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(tmp: Path, target: Path) -> None:
    """Put ``tmp`` in the place of ``target``; the old target is removed only once it is out.

    Where the system can, the two folders are exchanged atomically, so that a process killed at
    any moment leaves ``target`` holding a complete artifact, the previous or the new one;
    elsewhere two renames leave a short window in which ``target`` is missing.
    """
    if target.exists() and _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous artifact
        return
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _default_dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        os.fsync(f.fileno())


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# -- reading --------------------------------------------------------------------------------


def is_artifact(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST_NAME).is_file()


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of an artifact folder, checked for format and version (no file hashes)."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactNotFoundError(
            f"{str(directory)!r} holds no optimum-disc artifact ({MANIFEST_NAME} is missing); "
            "export one with DiscModelFor....from_pretrained(checkpoint, export=True) and "
            "save_pretrained(), or with `optimum-cli export disc`."
        )
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(
            f"artifact file {MANIFEST_NAME!r} in {str(directory)!r} is not valid JSON ({e}); "
            "the artifact is corrupt: export the model again."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise ValueError(
            f"{str(path)!r} is not an optimum-disc manifest (format="
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r}); "
            "export the model again."
        )
    version = manifest.get("format_version")
    if version != ARTIFACT_FORMAT_VERSION:
        from optimum_disc import __version__

        written_by = (manifest.get("versions") or {}).get("optimum_disc", "an unknown version")
        raise ValueError(
            f"the artifact in {str(directory)!r} has format_version {version!r}, written by "
            f"optimum-disc {written_by}; this optimum-disc ({__version__}) reads format_version "
            f"{ARTIFACT_FORMAT_VERSION} only. Export the model again with this version "
            "(`optimum-cli export disc --model <checkpoint> <folder>`), or install the "
            "optimum-disc version that wrote it."
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{str(path)!r} lists no files; export the model again.")
    for name in files:
        _check_name(name, directory)
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise ValueError(
            f"the manifest in {str(directory)!r} does not list {missing}; export the model again."
        )
    return manifest


def verify_files(directory: str | os.PathLike, manifest: dict) -> None:
    """Check every file listed in the manifest for presence, size and sha256."""
    directory = Path(directory)
    for name, entry in manifest["files"].items():
        path = directory / name
        problem = None
        if not path.is_file():
            problem = "is missing"
        else:
            size = path.stat().st_size
            if size != entry.get("size"):
                problem = (
                    f"has {size} bytes but the manifest says {entry.get('size')} "
                    "(truncated or modified)"
                )
            elif sha256_file(path) != entry.get("sha256"):
                problem = "does not match its sha256 in the manifest (modified or corrupt)"
        if problem:
            raise ValueError(
                f"artifact file {name!r} in {str(directory)!r} {problem}; do not edit the "
                "artifact's files: export the model again."
            )


def load_artifact(directory: str | os.PathLike) -> Artifact:
    """Read and verify an artifact folder: JSON and safetensors only."""
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    try:
        weights = load_file(str(directory / WEIGHTS_NAME), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(
            f"artifact file {WEIGHTS_NAME!r} in {str(directory)!r} cannot be read ({e}); "
            "export the model again."
        ) from None
    program_text = (directory / PROGRAM_NAME).read_text()
    try:
        settings = DiscSettings.from_dict(json.loads((directory / SETTINGS_NAME).read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"artifact file {SETTINGS_NAME!r} in {str(directory)!r}: {e}") from None
    try:
        program = Program.from_json(program_text, weights)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        # A program that passes the hashes but not the parser (an edit that rewrote the
        # manifest too): name the file rather than surface a bare KeyError or TypeError.
        detail = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise ValueError(
            f"artifact files {PROGRAM_NAME!r} and {WEIGHTS_NAME!r} in {str(directory)!r} do not "
            f"hold a valid program ({detail.split('; export')[0].rstrip('.')}); export the "
            "model again."
        ) from None
    return Artifact(directory=directory, manifest=manifest, program=program, settings=settings)


def artifact_files(directory: str | os.PathLike) -> list[str]:
    """The files of an artifact (relative paths), manifest included, after verifying them."""
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    return sorted([*manifest["files"], MANIFEST_NAME])


def _check_name(name: str, directory: Path) -> None:
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or "\\" in name or ".." in parts or not parts:
        raise ValueError(
            f"the manifest in {str(directory)!r} lists the file {name!r}, outside the folder; "
            "the artifact is corrupt or was tampered with: export the model again."
        )


# -- the Hub --------------------------------------------------------------------------------


def push_to_hub(
    save_directory: str | os.PathLike,
    repository_id: str,
    *,
    private: bool | None = None,
    token: bool | str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Upload an artifact folder to the Hub: create the repo, then one commit of its files.

    Only the files the manifest lists (and the manifest) are uploaded, after checking them.
    Returns the URL of the commit.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from optimum_disc import __version__

    directory = Path(save_directory)
    names = artifact_files(directory)
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    skipped = sorted(present - set(names))
    if skipped:
        logger.warning("not uploading %s: not part of the artifact in %s", skipped, directory)
    api = HfApi(token=token, library_name="optimum-disc", library_version=__version__)
    api.create_repo(repo_id=repository_id, private=private, exist_ok=True, repo_type="model")
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(directory / name))
        for name in names
    ]
    info = api.create_commit(
        repo_id=repository_id,
        operations=operations,
        commit_message=commit_message or "Upload a model compiled with optimum-disc",
        revision=revision,
        repo_type="model",
    )
    return str(getattr(info, "commit_url", info))
