"""Atomic file writes: a reader (or a crash) never sees a half-written checkpoint or data file."""
import contextlib
import os


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Yield a file object for a temporary file beside `path`; on success it is flushed,
    fsync'ed and renamed over `path`. On any error the temporary file is removed and `path`
    is left as it was."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    with atomic_write(path, "w") as f:
        f.write(text)
