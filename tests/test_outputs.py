import os
import stat

import pytest

from medgen.errors import MedgenError
from medgen.outputs import staged_dir


def test_staged_dir_gets_the_usual_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        with staged_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_staged_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError), staged_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(MedgenError, match="--overwrite"), staged_dir(tmp_path / "out"):
        pass
