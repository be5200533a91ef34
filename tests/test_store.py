import os
import signal
import subprocess
import sys

import pytest

from zimage_batch.errors import OutputError
from zimage_batch.store import LOCK, TEMP_PREFIX, LocalStore, locked, safe_name


@pytest.mark.parametrize("sku", ["A-1", "B/2", "../../etc/passwd", "咖啡杯", "C 3", "", ".hidden", "x" * 200, "a:b*c?"])
def test_safe_names_stay_inside_and_are_distinct(sku):
    name = safe_name(sku)
    assert name and "/" not in name and not name.startswith(".") and len(name) <= 80
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name)


def test_safe_names_keep_clean_skus_and_separate_lookalikes():
    assert safe_name("BTL-001") == "BTL-001"
    assert len({safe_name(s) for s in ["a/b", "a_b", "a b", "a?b"]}) == 4


def test_atomic_write_and_hash_check(tmp_path):
    store = LocalStore(tmp_path / "out")
    written = store.write("images/x/y.jpg", b"hello")
    assert (tmp_path / "out/images/x/y.jpg").read_bytes() == b"hello"
    assert written.bytes == 5 and store.holds("images/x/y.jpg", written.sha256)
    (tmp_path / "out/images/x/y.jpg").write_bytes(b"hellO")
    assert not store.holds("images/x/y.jpg", written.sha256)
    assert not store.holds("images/x/missing.jpg", written.sha256)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.startswith(TEMP_PREFIX)]


def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        store.write("a/b.jpg", b"data")
    assert list((tmp_path / "a").iterdir()) == []


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / "images/s").mkdir(parents=True)
    (tmp_path / f"images/s/{TEMP_PREFIX}abc").write_bytes(b"half")
    (tmp_path / "images/s/keep.jpg").write_bytes(b"x")
    assert LocalStore(tmp_path).remove_stale_temp_files() == 1
    assert [p.name for p in (tmp_path / "images/s").iterdir()] == ["keep.jpg"]


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        LocalStore(tmp_path / "f")


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    import stat

    LocalStore(tmp_path).write("images/a.jpg", b"x")
    mode = stat.S_IMODE((tmp_path / "images/a.jpg").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


HOLD = "import sys, time; from zimage_batch.store import locked; cm = locked(sys.argv[1]); cm.__enter__(); print('held', flush=True); time.sleep(120)"


def test_one_run_at_a_time_per_output_folder_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"in use by another zimage-batch run \(pid {holder.pid} on .*another --out"):
            with locked(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK).is_file()  # left by the killed holder
    with locked(out):  # the system released it with the killed process
        with locked(out):  # taken again in the process that holds it: a no-op
            (out / "manifest.jsonl").write_text("")
    assert [p.name for p in out.iterdir()] == ["manifest.jsonl"]  # the lock file goes with the run


def test_a_run_that_stops_before_writing_leaves_no_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with locked(tmp_path / "new" / "out"):
            raise RuntimeError("the model did not load")
    assert not (tmp_path / "new").exists()
    with locked(tmp_path):  # a folder that was there stays
        pass
    assert tmp_path.is_dir()


def test_a_file_system_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_flock(fd, operation):  # what Lustre mounted noflock, or some FUSE and CIFS mounts, answer
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with locked(tmp_path / "out"):
        (tmp_path / "out" / "manifest.jsonl").write_text("")
    assert "does not support file locks" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["manifest.jsonl"]
