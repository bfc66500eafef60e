"""Writing files so that a failed or interrupted run leaves nothing half-written: the one place for it.

Everything the project writes (tokenizer.json, MindRecord files, checkpoints and their folders, prediction results)
is written under a temporary name beside its destination and renamed into place when complete.
Plain Python: no MindSpore import.
"""
import contextlib
import os
import shutil
import uuid

__all__ = ["StagedFile", "StagedDir", "atomic_write_text", "staged_path"]


class _Staged:
    """Context-manager use of a staged output: committed when the block ends normally, aborted otherwise."""

    def commit(self):
        raise NotImplementedError

    def abort(self):
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


class StagedFile(_Staged):
    """Write to a temporary name beside ``path``; ``commit()`` renames it onto ``path``, ``abort()`` removes it.

    Usable as a context manager: the file is committed when the block ends normally and removed otherwise.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.tmp = os.path.join(os.path.dirname(self.path),
                                f".{os.path.basename(self.path)}.partial-{uuid.uuid4().hex[:12]}")

    def commit(self):
        os.replace(self.tmp, self.path)

    def abort(self):
        if os.path.lexists(self.tmp):
            os.remove(self.tmp)


class StagedDir(_Staged):
    """Build a folder's files in a staging folder, then move them into place in one go.

    A new folder is staged as a sibling ``.<name>.partial-<id>`` and renamed; files for an existing folder are staged
    in ``<dir>/.partial-<id>`` and moved in with ``os.replace`` (other files in the folder are left alone).
    ``abort()`` removes the staging folder, so a failed run leaves nothing behind. Also a context manager.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path.rstrip("/\\") or path)
        self.existed = os.path.isdir(self.path)
        if os.path.exists(self.path) and not self.existed:
            raise FileExistsError(f"{self.path} exists and is not a folder")
        tag = uuid.uuid4().hex[:12]
        if self.existed:
            self.tmp = os.path.join(self.path, f".partial-{tag}")
        else:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.tmp = os.path.join(os.path.dirname(self.path), f".{os.path.basename(self.path)}.partial-{tag}")
        os.makedirs(self.tmp)

    def file(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def commit(self):
        if self.existed:
            for name in sorted(os.listdir(self.tmp)):
                os.replace(os.path.join(self.tmp, name), os.path.join(self.path, name))
            os.rmdir(self.tmp)
        else:
            os.rename(self.tmp, self.path)

    def abort(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_path(path: str):
    """``with staged_path(p) as tmp:`` write ``tmp`` (a file name beside ``p``); renamed onto ``p`` at the end of
    the block, removed if the block raises."""
    staged = StagedFile(path)
    try:
        yield staged.tmp
    except BaseException:
        staged.abort()
        raise
    staged.commit()


def atomic_write_text(path: str, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file beside it; returns ``path``.

    The file gets the usual mode (0666 less the umask), not mkstemp's 0600.
    """
    with staged_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    return path
