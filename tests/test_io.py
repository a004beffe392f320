"""mcensemble._io: atomic writes."""
from __future__ import annotations


# moved from test_review_fixes.py


def test_atomic_path_gives_the_usual_file_mode(tmp_path):
    from mcensemble._io import atomic_path

    with atomic_path(tmp_path / "out.json") as tmp:
        tmp.write_text("{}")
    (tmp_path / "plain.json").write_text("{}")
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777
