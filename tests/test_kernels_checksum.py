"""The one-pass crc32c kernel (`sdl.kernels.checksum`) against the `crc32c` package and a
bit-by-bit reference, at lengths around its three-lane split, and as a chunk reader."""
import os
import platform

import crc32c as crc32c_package
import numpy as np
import pytest

from sdl.kernels import checksum
from tests.test_data_store import crc32c_reference

# Around the edges: below a lane (serial), at and past the three-lane minimum (3 x 4096),
# lanes that are not a multiple of 64, a tail after the lanes, several read pieces.
LENGTHS = [0, 1, 7, 8, 9, 63, 64, 65, 4095, 12287, 12288, 12289, 12352, 50001, 196608,
           196609, (2 << 20) + 5]


@pytest.mark.parametrize("path", list(checksum.PATHS))
@pytest.mark.parametrize("n", LENGTHS)
def test_crc32c_matches_the_crc32c_package_and_continues(n, path):
  data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
  expected = crc32c_package.crc32c(data)
  assert checksum.crc32c(data, path=path) == expected
  assert checksum.crc32c(data[n // 3:], checksum.crc32c(data[:n // 3]), path) == expected
  buffer = np.zeros(n + 64 + 5, np.uint8)
  for at in (64, 5):  # a 64-byte aligned destination (streaming stores), an unaligned one
    dst = buffer[at:at + n]
    assert checksum.copy_crc32c(data, dst, path=path) == expected
    np.testing.assert_array_equal(dst, data)
  if n < 5000:  # the independent, bit-by-bit reference is slow
    assert checksum.crc32c(data.tobytes(), path=path) == crc32c_reference(data.tobytes())


def test_the_build_uses_the_crc_instruction_where_the_cpu_has_one():
  flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
  if platform.machine() == "x86_64" and " sse4_2" in flags:
    assert checksum.kind().startswith("x86"), checksum.kind()
    if " vpclmulqdq" in flags and " avx512f" in flags:
      assert "folding" in checksum.kind(), checksum.kind()
  elif platform.machine() == "aarch64" and " crc32" in flags:
    assert checksum.kind().startswith("ARMv8"), checksum.kind()
  else:
    assert checksum.kind().startswith("table"), checksum.kind()


def test_crc32c_of_known_strings():
  assert checksum.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  assert checksum.crc32c(b"") == 0


# the trailer in the last piece, just not, or alone after whole pieces
@pytest.mark.parametrize("n", [100, 12289, checksum.PIECE - 4, checksum.PIECE - 2,
                               checksum.PIECE, checksum.PIECE * 2 + 4097, (2 << 20) + 4])
def test_read_verified_checks_every_byte_and_copies_the_asked_part(tmp_path, n):
  data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
  (tmp_path / "f").write_bytes(data.tobytes() + b"tail")
  fd = os.open(tmp_path / "f", os.O_RDONLY)
  try:
    expected = crc32c_package.crc32c(data)
    whole = np.zeros(n, np.uint8)
    assert checksum.read_verified(fd, n, whole) == (expected, int.from_bytes(b"tail", "little"))
    np.testing.assert_array_equal(whole, data)
    # parts that start and end inside read pieces, at unaligned addresses
    for lo, hi in [(0, 1), (3, n // 2), (n // 3, n - 1), (n - 7, n)]:
      buffer = np.full(hi - lo + 3, 7, np.uint8)
      part = buffer[3:]  # not 16-byte aligned
      assert checksum.read_verified(fd, n, part, lo)[0] == expected
      np.testing.assert_array_equal(part, data[lo:hi])
      assert (buffer[:3] == 7).all()  # nothing written before the part
    assert checksum.read_verified(fd, n + 1, np.zeros(4, np.uint8)) is None  # ended early
    with pytest.raises(ValueError, match="out of range"):
      checksum.read_verified(fd, n, np.zeros(8, np.uint8), n - 4)
  finally:
    os.close(fd)


def test_threads_that_first_use_the_kernel_together_share_one_build(tmp_path, monkeypatch):
  """A dataset's reader threads are the kernel's first users: all must get the kernel,
  compiled once, with no temporary file left (a shared temporary name once made all but
  one of them fall back, and the fallback stuck for the process)."""
  import threading
  monkeypatch.setenv("SDL_KERNEL_CACHE", str(tmp_path / "cache"))
  checksum._load.cache_clear()
  data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)
  want = crc32c_package.crc32c(data)
  results, start = [], threading.Barrier(6)

  def first_use():
    start.wait()
    results.append(checksum.available() and checksum.crc32c(data))
  threads = [threading.Thread(target=first_use) for _ in range(6)]
  try:
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    checksum._load.cache_clear()  # later tests load the cached library again
  assert results == [want] * 6
  assert [p.name for p in (tmp_path / "cache").iterdir() if "copycrc" in p.name] == [
      p.name for p in (tmp_path / "cache").glob("libcopycrc-*.so")]
  assert len(list((tmp_path / "cache").glob("libcopycrc-*.so"))) == 1
