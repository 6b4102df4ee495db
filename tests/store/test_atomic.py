import numpy as np
import pytest

from mess_ai.store.atomic import (
    atomic_npy_memmap,
    atomic_save_npy,
    atomic_write_json,
    load_npy,
    read_npy_header,
    target_of_temp,
    temp_path_for,
)


def test_save_and_load_roundtrip(tmp_path):
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    atomic_save_npy(tmp_path / "a" / "x.npy", array)
    assert np.array_equal(load_npy(tmp_path / "a" / "x.npy"), array)
    assert read_npy_header(tmp_path / "a" / "x.npy") == ((3, 4), np.dtype(np.float32))
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.npy"]


def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path):
    path = tmp_path / "x.npy"
    atomic_save_npy(path, np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError):
        atomic_save_npy(path, np.array([object()], dtype=object))  # pickling refused mid-write
    assert np.array_equal(load_npy(path), np.zeros(3, dtype=np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]


def test_memmap_appears_only_when_complete(tmp_path):
    path = tmp_path / "raw.npy"
    with pytest.raises(RuntimeError):
        with atomic_npy_memmap(path, (2, 3), np.float16) as out:
            out[0] = 1
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_npy_memmap(path, (2, 3), np.float16) as out:
        out[:] = 2
    assert load_npy(path).tolist() == [[2, 2, 2], [2, 2, 2]]


def test_truncated_file_is_detected_from_header(tmp_path):
    path = tmp_path / "x.npy"
    atomic_save_npy(path, np.ones((10, 10), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="header promises"):
        read_npy_header(path)


def test_pickled_arrays_are_refused(tmp_path):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_npy(path)
    with pytest.raises(ValueError):
        read_npy_header(path)


def test_temp_names_map_back_to_targets(tmp_path):
    temp = temp_path_for(tmp_path / "track-1.npy")
    assert temp.name.startswith(".track-1.npy.tmp-")
    assert target_of_temp(temp) == tmp_path / "track-1.npy"
    assert target_of_temp(tmp_path / "track-1.npy") is None
    atomic_write_json(tmp_path / "p.json", {"b": 1})
    assert (tmp_path / "p.json").read_text().strip().startswith("{")
