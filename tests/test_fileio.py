"""fileio: what the project writes appears whole or not at all."""
import os

import pytest

from research.deepseek2.fileio import StagedDir, StagedFile, atomic_write_text, staged_path


def test_atomic_write_text_leaves_only_the_file(tmp_path):
    path = atomic_write_text(str(tmp_path / "deep" / "a.txt"), "héllo")
    assert open(path, encoding="utf-8").read() == "héllo"
    assert os.listdir(tmp_path / "deep") == ["a.txt"]
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_block_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with staged_path(str(target)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(RuntimeError):
        with StagedFile(str(tmp_path / "new.bin")) as staged:
            open(staged.tmp, "w").write("half")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("existing", [False, True])
def test_staged_dir_moves_all_files_in_or_none(tmp_path, existing):
    folder = tmp_path / "ckpt"
    if existing:
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with StagedDir(str(folder)) as stage:
            open(stage.file("a"), "w").write("1")
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == (["ckpt"] if existing else [])
    with StagedDir(str(folder)) as stage:
        for name in ("a", "b"):
            open(stage.file(name), "w").write(name)
    assert sorted(os.listdir(folder)) == (["a", "b", "keep.txt"] if existing else ["a", "b"])
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
