"""The inputs' sha256 and the cache that remembers it between runs (merge_core.files.digests)."""
import hashlib
import json
import os

import pytest

from merge_core.files import digests


def real_sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of the test's own, files counted as settled as soon as written; returns its JSON file."""
    monkeypatch.setenv(digests.ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(digests, "SETTLE_SECONDS", 0.0)
    return tmp_path / "cache" / digests.FILE_NAME


@pytest.fixture
def lora_file(tmp_path):
    f = tmp_path / "in.safetensors"
    f.write_bytes(os.urandom(100_000))
    return f


def no_hashing(monkeypatch):
    def refuse(*_):
        raise AssertionError("hashed although the cache holds this file")
    monkeypatch.setattr(digests, "sha256_of", refuse)


def test_hash_is_remembered_and_reused(cache, lora_file, monkeypatch):
    assert digests.input_sha256(lora_file) == real_sha256(lora_file)
    entries = json.loads(cache.read_text())
    assert entries[str(lora_file.resolve())]["sha256"] == real_sha256(lora_file)
    no_hashing(monkeypatch)
    assert digests.input_sha256(lora_file) == real_sha256(lora_file)
    assert digests.sha256_later(lora_file).result() == real_sha256(lora_file)


def test_changed_file_is_hashed_again_even_with_its_old_times(cache, lora_file):
    digests.input_sha256(lora_file)
    st = lora_file.stat()
    lora_file.write_bytes(os.urandom(st.st_size))  # same size, new bytes
    os.utime(lora_file, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    assert digests.input_sha256(lora_file) == real_sha256(lora_file)


def test_replaced_file_is_hashed_again(cache, lora_file, tmp_path):
    digests.input_sha256(lora_file)
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(100_000))
    os.replace(other, lora_file)  # a new inode under the same name
    assert digests.input_sha256(lora_file) == real_sha256(lora_file)


def test_file_changed_just_before_hashing_is_not_remembered(tmp_path, lora_file, monkeypatch):
    monkeypatch.setenv(digests.ENV, str(tmp_path / "cache"))  # default SETTLE_SECONDS: lora_file is brand new
    assert digests.input_sha256(lora_file) == real_sha256(lora_file)
    assert not (tmp_path / "cache" / digests.FILE_NAME).exists()


def test_off_keeps_nothing(tmp_path, lora_file, monkeypatch):
    monkeypatch.setenv(digests.ENV, "off")
    monkeypatch.setattr(digests, "SETTLE_SECONDS", 0.0)
    assert digests.cache_file() is None
    assert digests.input_sha256(lora_file) == real_sha256(lora_file)
    assert not (tmp_path / "cache").exists()


def test_default_location_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv(digests.ENV, raising=False)
    monkeypatch.setenv("LOCALAPPDATA" if os.name == "nt" else "XDG_CACHE_HOME", str(tmp_path))
    assert digests.cache_file() == tmp_path / "lora-rsvd-merge" / digests.FILE_NAME


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"x": {"stat": [1], "sha256": "not hex"}}'])
def test_damaged_cache_is_passed_over_and_rewritten(cache, lora_file, content):
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    assert digests.input_sha256(lora_file) == real_sha256(lora_file)
    assert list(json.loads(cache.read_text())) == [str(lora_file.resolve())]


def test_unwritable_cache_costs_only_the_hash(tmp_path, lora_file, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv(digests.ENV, str(blocker / "cache"))
    monkeypatch.setattr(digests, "SETTLE_SECONDS", 0.0)
    assert digests.input_sha256(lora_file) == real_sha256(lora_file)
    assert blocker.read_text().startswith("a file")


def test_oldest_entries_are_dropped(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "MAX_ENTRIES", 2)
    files = []
    for i in range(3):
        f = tmp_path / f"f{i}.bin"
        f.write_bytes(bytes([i]) * 10)
        files.append(f)
        digests.input_sha256(f)
    assert list(json.loads(cache.read_text())) == [str(f.resolve()) for f in files[1:]]


def test_folders_are_hashed_every_time(cache, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 10)
    first = digests.input_sha256(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"y" * 10)
    assert digests.input_sha256(folder) != first
    assert not cache.exists()
