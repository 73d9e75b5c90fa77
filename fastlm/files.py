"""Atomic file writes and the out_dir lock: a reader (or a crash) never sees a half-written
checkpoint or data file, and two runs never write into one directory at once."""
import contextlib
import fcntl
import glob
import os
import socket

TMP_MARK = ".tmp-"  # atomic_write's temporary files are `<name>.tmp-<pid>`


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Yield a file object for a temporary file beside `path`; on success it is flushed,
    fsync'ed and renamed over `path` (and the rename made durable). On any error, a full disk
    included, the temporary file is removed and `path` is left as it was."""
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    with atomic_write(path, "w") as f:
        f.write(text)


def fsync_dir(path):
    """Make renames and links in directory `path` survive a power cut (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(directory):
    """Remove the temporary files that a killed writer left in `directory` (call with its lock held)."""
    for path in glob.glob(os.path.join(glob.escape(directory), f"*{TMP_MARK}*")):
        with contextlib.suppress(OSError):
            os.remove(path)


class DirectoryLock:
    """An exclusive lock on a directory: `<directory>/.lock`, holding the owner's pid and host.

    Taken with fcntl.flock, so the kernel releases it when the process dies, kill -9 included:
    a killed run never leaves a stale lock. The file itself stays; only the flock matters.
    """

    NAME = ".lock"

    def __init__(self, directory):
        self.path = os.path.join(directory, self.NAME)
        self._file = None

    def acquire(self):
        """Take the lock; returns False (and holds nothing) if another process holds it.
        Raises OSError if the directory is not writable."""
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return True

    def owner(self):
        """'pid N on host H' as written by the holder, or '' if unreadable."""
        try:
            with open(self.path) as f:
                pid, _, host = f.read().strip().partition(" ")
        except OSError:
            return ""
        return f"pid {pid} on {host}" if pid else ""

    def release(self):
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None
