"""Byte sources for the data set walk: in memory, in a file, or inflated as it is read.

:mod:`node.store.reader` walks a data set through one of these: a
:class:`RawSource` over bytes in memory (read forward without copying), a
:class:`FileSource` over the file a C-STORE was received into (values skipped
are seeked over, never read), or an :class:`InflateSource` over either, which
inflates a Deflated Explicit VR Little Endian data set in chunks and refuses
it as soon as it passes the size or ratio caps of :class:`ReadLimits`.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

from node.dicom.status import CannotUnderstand, DatasetTooLarge

MiB = 1024 * 1024

#: Input fed to the inflater per step, and most output it may return per step.
_INFLATE_IN = 64 * 1024
_INFLATE_OUT = 1 * MiB


@dataclass(frozen=True)
class ReadLimits:
    """What one data set may cost to read; anything beyond is refused.

    ``max_dataset_bytes`` bounds the received data set and, for a deflated one,
    its inflated size. ``max_inflate_ratio`` (inflated / deflated bytes) is
    checked once ``ratio_floor_bytes`` have been inflated, so a small blank
    image that deflates very well is still accepted. ``max_depth`` bounds
    sequence nesting, ``max_elements`` the number of elements walked (CPU).
    """

    max_dataset_bytes: int = 512 * MiB
    max_inflate_ratio: float = 100.0
    ratio_floor_bytes: int = 16 * MiB
    max_depth: int = 32
    max_elements: int = 1_000_000

    def __post_init__(self) -> None:
        if self.max_dataset_bytes <= 0 or self.max_depth <= 0 or self.max_elements <= 0:
            raise ValueError("read limits must be positive")
        if self.max_inflate_ratio < 1:
            raise ValueError("max_inflate_ratio must be at least 1")


class Ended(Exception):
    """The source has fewer bytes than asked for (the caller names the element)."""


class RawSource:
    """A data set already in memory, read forward without copying."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self.position = 0

    def read(self, n: int) -> bytes:
        end = self.position + n
        if end > len(self._view):
            raise Ended
        chunk = bytes(self._view[self.position : end])
        self.position = end
        return chunk

    def read_upto(self, n: int) -> memoryview:
        """At most ``n`` bytes (fewer at the end), without copying."""
        chunk = self._view[self.position : self.position + n]
        self.position += len(chunk)
        return chunk

    def skip(self, n: int) -> None:
        if self.position + n > len(self._view):
            raise Ended
        self.position += n

    def exhausted(self) -> bool:
        return self.position >= len(self._view)

    def remaining(self) -> int:
        return len(self._view) - self.position


class FileSource:
    """A data set in a file from ``start`` to its end: values skipped are never read."""

    def __init__(self, fh: io.BufferedReader, start: int, size: int) -> None:
        self._fh = fh
        self._size = size
        self.position = 0
        fh.seek(start)

    def read(self, n: int) -> bytes:
        if self.position + n > self._size:
            raise Ended
        chunk = self._fh.read(n)
        if len(chunk) != n:  # the file shrank under us
            raise Ended
        self.position += n
        return chunk

    def read_upto(self, n: int) -> bytes:
        """At most ``n`` bytes (fewer at the end)."""
        chunk = self._fh.read(min(n, self.remaining()))
        self.position += len(chunk)
        return chunk

    def skip(self, n: int) -> None:
        if self.position + n > self._size:
            raise Ended
        self._fh.seek(n, io.SEEK_CUR)
        self.position += n

    def exhausted(self) -> bool:
        return self.position >= self._size

    def remaining(self) -> int:
        return self._size - self.position


class InflateSource:
    """A deflated data set (PS3.5 A.5), inflated in chunks as it is read.

    Only the bytes not yet read are buffered (at most ~1 MiB), so skipping a
    gigabyte of inflated Pixel Data costs CPU, never memory; the size and ratio
    limits stop a bomb long before that.
    """

    def __init__(self, deflated: RawSource | FileSource, limits: ReadLimits) -> None:
        self._in = deflated
        self._limits = limits
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._buf_pos = 0
        self.position = 0
        self.inflated = 0
        self.trailing_bytes = 0

    def _more(self) -> bool:
        """Inflate the next chunk into the buffer; False once the stream has ended."""
        if self._z.eof:
            return False
        data: bytes | memoryview = self._z.unconsumed_tail
        if not data:
            data = self._in.read_upto(_INFLATE_IN)
            if not data:
                raise CannotUnderstand("deflated data set is truncated (the stream does not end)")
        try:
            out = self._z.decompress(data, _INFLATE_OUT)
        except zlib.error as exc:
            raise CannotUnderstand(f"deflated data set cannot be inflated: {exc}") from exc
        self.inflated += len(out)
        self._check_limits()
        if self._buf_pos > _INFLATE_OUT:
            del self._buf[: self._buf_pos]
            self._buf_pos = 0
        self._buf += out
        if self._z.eof:
            self.trailing_bytes = len(self._z.unused_data) + self._in.remaining()
        return True

    def _check_limits(self) -> None:
        limits = self._limits
        if self.inflated > limits.max_dataset_bytes:
            raise DatasetTooLarge(
                f"deflated data set inflates past the {limits.max_dataset_bytes // MiB} MiB "
                "cap (storage.max_dataset_mb)"
            )
        if self.inflated > limits.ratio_floor_bytes:
            consumed = max(1, self._in.position - len(self._z.unconsumed_tail))
            ratio = self.inflated / consumed
            if ratio > limits.max_inflate_ratio:
                raise DatasetTooLarge(
                    f"deflated data set inflates {ratio:.0f}:1, over the "
                    f"{limits.max_inflate_ratio:g}:1 cap (storage.max_inflate_ratio)"
                )

    def _buffered(self) -> int:
        return len(self._buf) - self._buf_pos

    def read(self, n: int) -> bytes:
        while self._buffered() < n:
            if not self._more():
                raise Ended
        chunk = bytes(self._buf[self._buf_pos : self._buf_pos + n])
        self._buf_pos += n
        self.position += n
        return chunk

    def skip(self, n: int) -> None:
        left = n
        while left:
            if not self._buffered() and not self._more():
                raise Ended
            step = min(left, self._buffered())
            self._buf_pos += step
            self.position += step
            left -= step

    def exhausted(self) -> bool:
        while not self._buffered():
            if not self._more():
                return True
        return False

    def remaining(self) -> int | None:
        return None


Source = RawSource | FileSource | InflateSource
