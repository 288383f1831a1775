"""One scheme for writing a checkpoint directory atomically, used by conversion and `save_pretrained`.

`atomic_output_dir(dst)` yields a hidden directory beside `dst` (`.NAME.partial-PID-RANDOM`); when the block
completes, the new directory takes `dst`'s place: swapped in one `renameat2(RENAME_EXCHANGE)` call where the
kernel offers it (Linux), else with two renames whose gap is repaired by the next call. Readers see the old
directory or the new one, never a mixture; an exception, Ctrl-C or SIGTERM inside the block removes the partial
directory and leaves `dst` as it was; directories left behind by a killed process (its pid gone) are cleaned up
(or, for a swap cut between its two renames, put back) by the next call for the same `dst`.
Every file is fsynced before the rename that publishes it, so a crash after it never finds empty files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import uuid

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def umask_mode(directory: bool = False) -> int:
    """The mode `open` / `os.mkdir` would give a new file (0o666) or directory (0o777) under the process's umask:
    for what `tempfile.mkstemp` / `mkdtemp` create owner-only, before it is renamed into a user's path."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux renameat2); False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _clean_stale(parent: str, name: str, dst: str) -> None:
    """Removes what killed processes left for `dst`; restores `dst` from a swap cut between its renames."""
    for kind in ("old", "partial"):
        for stale in sorted(glob.glob(os.path.join(parent, f".{glob.escape(name)}.{kind}-*"))):
            try:
                pid = int(stale.rsplit("-", 2)[-2])
            except ValueError:
                continue
            if _pid_alive(pid):
                continue
            if kind == "old" and not os.path.lexists(dst):
                os.rename(stale, dst)  # the old directory was moved aside and the new one never arrived
            else:
                shutil.rmtree(stale, ignore_errors=True)


def _carry_over(old: str, new: str, is_replaced) -> None:
    """Hard-links (or copies) into `new` every entry of `old` that `is_replaced(name)` does not claim."""
    for name in os.listdir(old):
        if is_replaced(name) or os.path.lexists(os.path.join(new, name)):
            continue
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_output_dir(dst, overwrite: bool = False, keep=None):
    """Yields a hidden temporary directory beside `dst` that replaces `dst` when the block completes.

    Args:
      dst: the output directory (relative, absolute or `~/...`; a symlink is followed, so its target is replaced).
        Parent directories are created as needed, and removed again when the block fails.
      overwrite: replace an existing `dst` (otherwise FileExistsError, before anything is written).
      keep: when `dst` exists, a predicate on the names in it: entries for which `keep(name)` is False (the old
        weights, config) are dropped; the rest (tokenizer files, a README) are carried into the new directory
        as hard links. None drops everything: the new directory replaces the old one whole.
    """
    dst = os.path.realpath(os.path.expanduser(os.fspath(dst)))
    parent, name = os.path.dirname(dst), os.path.basename(dst)
    if os.path.isdir(parent):
        _clean_stale(parent, name, dst)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"output {dst} already exists; pass --overwrite (overwrite=True) to replace it")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise NotADirectoryError(f"output {dst} exists and is not a directory")
    created = make_dirs(parent)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = os.path.join(parent, f".{name}.partial-{tag}")
    try:
        os.mkdir(tmp)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield tmp
        _sync_tree(tmp)  # on disk before the rename that publishes it: a crash never leaves an empty config.json
        if not os.path.lexists(dst):
            os.rename(tmp, dst)
            _sync_dir(parent)
            return
        if keep is not None:
            _carry_over(dst, tmp, lambda n: not keep(n))
        cwd = _cwd_inside(dst)
        if _exchange(tmp, dst):
            old = tmp  # after the swap the temporary name holds the old directory
        else:
            old = os.path.join(parent, f".{name}.old-{tag}")
            os.rename(dst, old)
            os.rename(tmp, dst)
        _sync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
        if cwd is not None and os.path.isdir(cwd):
            os.chdir(cwd)  # a process working inside `dst` follows it to the new directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _sync_tree(root: str) -> None:
    """fsyncs every file and directory under `root` (files already synced, such as the shards, cost nothing)."""
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _sync_dir(directory)


def _sync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory
        pass
    finally:
        os.close(fd)


def make_dirs(parent: str) -> list[str]:
    """`os.makedirs(parent)`, returning the directories it created, deepest first (for `remove_created`)."""
    missing = []
    while not os.path.isdir(parent) and parent != os.path.dirname(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    created = []
    try:
        for directory in reversed(missing):
            try:
                os.mkdir(directory)
            except FileExistsError:
                if not os.path.isdir(directory):
                    raise NotADirectoryError(f"cannot create {directory}: a file of that name exists") from None
                continue  # made meanwhile by another process: not ours to remove
            created.insert(0, directory)
    except BaseException:
        _remove_empty(created)
        raise
    return created


def _remove_empty(directories: list[str]) -> None:
    """Removes what `make_dirs` created (deepest first) and is still empty: a failed write leaves nothing new."""
    for directory in directories:
        try:
            os.rmdir(directory)
        except OSError:
            return  # not empty (something else was written there meanwhile) or already gone: keep the rest


def _cwd_inside(directory: str) -> str | None:
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        return None
    return cwd if cwd == directory or cwd.startswith(directory + os.sep) else None


def remove_created(created: list[str]) -> None:
    """After a failure: the empty directories below the deepest of `created` (those `make_dirs` returned), innermost
    first, then `created` itself, as far as each is empty; anything that holds a file stays, with its parents."""
    if not created:
        return
    below = [root for root, _, _ in os.walk(created[0], topdown=False)][:-1]  # innermost first, created[0] last
    for directory in below:
        try:
            os.rmdir(directory)
        except OSError:
            return
    _remove_empty(created)
