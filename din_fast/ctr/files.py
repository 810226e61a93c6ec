"""The files the din-fast commands write: which paths they may take, and how
they are written.

The rules, checked by :func:`check_outputs` before any work starts:

- an output is a file path: not a directory, nor a name ending in a slash;
- if it exists, it is a regular file, and one you may write (a rename would
  replace a read-only file too): a device, pipe or socket (``/dev/full``)
  cannot be replaced by a rename, so it is refused, and so is a file
  descriptor's alias (``/dev/stdout``, ``/proc/self/fd/1``), whatever it is
  redirected to;
- its directory exists and takes a new file (tried: a probe file is created
  and removed, which also catches read-only filesystems and root's bypass of
  permission bits);
- it is none of the command's inputs and none of its other outputs, compared
  by resolved path (symlinks, ``..``, relative paths) and, where both exist,
  by device and inode (hard links, bind mounts).

Writing (:func:`replacing`, :func:`open_replacing`): into a temporary file
beside the target (same directory, so same filesystem), flushed to disk, then
renamed over the target, so that a reader sees the old file or the new one and
never part of one. On any failure or interrupt the temporary file is removed
and the old file is left as it was; an OSError (disk full, quota, I/O error)
becomes an OutputError naming the option. A symlinked target is written
through (the link stays, the file it points to is replaced); a target with
other hard links is replaced under this name only (the other names keep the
old contents).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import PurePath
from typing import Iterator, Optional

from .errors import InputError, OutputError

# The temporary file of "dir/name.ext" is "dir/.name.ext.<random>.tmp.ext": hidden,
# recognizable, and with the target's suffix, which some writers read the
# format from (matplotlib, AOTInductor's .pt2). The name is cut to stay far
# below the usual 255-byte limit.
TEMPORARY_SUFFIX = ".tmp"
NAME_CHARS = 100


def check_outputs(outputs: dict, inputs: Optional[dict] = None) -> None:
    """OutputError unless every output (``{option: path or None}``) can be
    written without touching an input (``{option: path, list of paths or
    None}``: the files the command reads) or another output."""
    given = [(option, path) for option, path in outputs.items() if path is not None]
    sources = [(option, source) for option, paths in (inputs or {}).items()
               for source in (paths if isinstance(paths, (list, tuple)) else [paths])
               if source is not None]
    for option, path in given:
        check_output(option, path)
    for index, (option, path) in enumerate(given):
        for source_option, source in sources:
            if same_file(path, source):
                raise OutputError(f"{option} {path}: is {source}, an input of this command "
                                  f"({source_option}); writing it would destroy the input; "
                                  "choose another path")
        for other_option, other in given[:index]:
            if same_file(path, other):
                raise OutputError(f"{option} {path}: is also the path of {other_option} "
                                  f"{other}; each output needs a path of its own")


def check_output(option: str, path) -> None:
    """OutputError unless ``path`` can take a file written by :func:`replacing`."""
    text = os.fspath(path)
    if not text:
        raise OutputError(f"{option}: an empty path; expected a file path")
    if text.endswith(("/", os.sep)) or os.path.isdir(text):
        raise OutputError(f"{option} {text}: is a directory; expected a file path")
    if _names_a_descriptor(text):
        raise OutputError(f"{option} {text}: names an open file descriptor (like /dev/stdout "
                          "or /dev/fd/N), which a file renamed into place cannot replace; give a file "
                          "path")
    try:
        mode = os.stat(text).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as error:
        raise OutputError(f"{option} {text}: cannot be inspected ({error.strerror})") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f"{option} {text}: not a regular file (a device, pipe or socket); "
                          "din-fast writes a file beside its output and renames it into place, "
                          "which cannot replace such a file; give a file path")
    # A rename would replace a read-only file too; its permissions mean keep it.
    if mode is not None and not os.access(text, os.W_OK):
        raise OutputError(f"{option} {text}: exists and is read-only; choose another path or "
                          "make it writable")
    directory = os.path.dirname(os.path.realpath(text))
    if not os.path.isdir(directory):
        raise OutputError(f"{option} {text}: directory {directory} does not exist")
    refused = _why_no_new_file(directory)
    if refused:
        raise OutputError(f"{option} {text}: directory {directory} is not writable ({refused})")


def check_output_directory(option: str, path, outputs: Optional[dict] = None) -> None:
    """OutputError unless ``path`` is a directory that takes new files, or can
    be created as one: its nearest existing ancestor is a directory that takes
    new entries, and none of the command's output files (``{option: path or
    None}``) is to be written where it, or a directory above it, would be
    created (one of the two would fail once the other is in place, after the
    work). Nothing is created (the command creates it with its first file, so
    that a refused command leaves nothing behind); the files it will hold are
    checked with :func:`check_outputs` where it exists."""
    text = os.fspath(path)
    if not text:
        raise OutputError(f"{option}: an empty path; expected a directory path")
    resolved = os.path.realpath(text)
    for other_option, other in (outputs or {}).items():
        # An output that exists is refused here or by check_outputs, as a file
        # (in the way of the directory) or a directory (no file path).
        if other is None or os.path.exists(other):
            continue
        target = os.path.realpath(other)
        if resolved == target or resolved.startswith(target.rstrip(os.sep) + os.sep):
            raise OutputError(f"{option} {text}: would be created as a directory where "
                              f"{other_option} {other} is to be written; each output needs a "
                              "path of its own")
    wanted = os.path.abspath(text)
    ancestor = wanted
    # lexists: a symbolic link to nothing stops the walk (no directory can be
    # created through it).
    while not os.path.lexists(ancestor) and ancestor != os.path.dirname(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        what = "a symbolic link to nothing" if os.path.islink(ancestor) else "a file"
        where = f"it is {what}" if ancestor == wanted else f"{ancestor} is {what}"
        raise OutputError(f"{option} {text}: cannot be created as a directory ({where}); "
                          "give a directory path")
    refused = _why_no_new_file(ancestor)
    if refused:
        what = "is" if ancestor == wanted else f"cannot be created: {ancestor} is"
        raise OutputError(f"{option} {text}: {what} not writable ({refused})")


def _why_no_new_file(directory: str) -> Optional[str]:
    """None if a file can be created in ``directory``, else why not. Tried
    with a probe file, removed: permission bits alone miss read-only
    filesystems and root's bypass of them."""
    try:
        handle, probe = tempfile.mkstemp(dir=directory, prefix=".din-fast-probe.")
    except OSError as error:
        return error.strerror
    os.close(handle)
    os.remove(probe)
    return None


def _names_a_descriptor(text: str) -> bool:
    """Whether a path is, or links to, a file descriptor's alias (/dev/stdout
    links to /proc/self/fd/1): replacing what it resolves to would replace
    whatever file the descriptor happens to be redirected to."""
    path = os.path.abspath(text)
    for _ in range(40):     # the kernel's own limit on links in a row
        if path.startswith(("/proc/", "/dev/fd/")):
            return True
        if not os.path.islink(path):
            return False
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    return False


def same_file(a, b) -> bool:
    """Whether the paths ``a`` and ``b`` name one file: the same resolved path,
    or (both existing) the same device and inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except (OSError, ValueError):
        return False


@contextmanager
def replacing(path, option: str) -> Iterator[str]:
    """A temporary path beside ``path`` for the new file; when the block ends
    without an error, the file there is flushed to disk and renamed over
    ``path``. On an error or interrupt it is removed and ``path`` stays as it
    was; an error with an OSError behind it about no file or the temporary one
    (see :func:`_os_error_behind`) becomes an OutputError naming ``option``."""
    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    try:
        handle, temporary = tempfile.mkstemp(
            dir=directory, prefix=f".{name[:NAME_CHARS]}.",
            suffix=TEMPORARY_SUFFIX + PurePath(name).suffix[:NAME_CHARS])
    except OSError as error:
        raise _write_failed(option, path, error) from None
    os.close(handle)
    try:
        yield temporary
        _flush_to_disk(temporary)
        os.chmod(temporary, _mode_for(target))
        os.replace(temporary, target)
    except BaseException as error:
        _remove(temporary)
        cause = _os_error_behind(error)
        # An OSError about another file (a compiler that is missing, say) is
        # not this write's failure: it goes on as it is.
        if not isinstance(error, Exception) or isinstance(error, InputError) or cause is None \
                or cause.filename not in (None, temporary):
            raise
        raise _write_failed(option, path, cause) from error
    _flush_directory(directory)


@contextmanager
def open_replacing(path, option: str, mode: str = "w", **options):
    """:func:`replacing`, with the temporary file opened (``open``'s mode and options)."""
    with replacing(path, option) as temporary, open(temporary, mode, **options) as handle:
        yield handle


def write_json(path, values, option: str) -> None:
    """``values`` as indented JSON (UTF-8) to ``path``, through :func:`replacing`."""
    with open_replacing(path, option, encoding="utf-8") as handle:
        json.dump(values, handle, indent=2)


def _os_error_behind(error: BaseException) -> Optional[OSError]:
    """The OSError ``error`` is, or was raised from or while handling: torch.save's
    zip writer, for one, reports a failed write as a RuntimeError raised while
    handling the OSError."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _write_failed(option: str, path, error: OSError) -> OutputError:
    kept = "the existing file is unchanged" if os.path.exists(path) else "nothing was written"
    return OutputError(f"{option} {path}: could not be written "
                       f"({error.strerror or type(error).__name__}); {kept}")


def _mode_for(target: str) -> int:
    """The permissions of the file replacing ``target``: its own where it
    exists, else what ``open`` would give a new file (mkstemp's are 0600)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _flush_to_disk(path: str) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _flush_directory(directory: str) -> None:
    """Make the rename itself durable, where the filesystem can sync a
    directory (some cannot: the file is in place either way)."""
    try:
        _flush_to_disk(directory)
    except OSError:
        pass


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:     # gone already, or not ours to remove: the error at hand matters more
        pass
