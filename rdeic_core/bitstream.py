"""Self-describing RDEIC bitstream container, format version 1.

At extreme rates a whole image is a few hundred bytes, so the header is kept
compact (variable-length integers where values vary, fixed widths where they
do not) but it carries everything needed to decode without side channels:
the model that wrote it, the original size, the decoding defaults, the noise
seed and the payload lengths. A CRC32 over the whole stream turns any
corruption into a clear error instead of a garbage image (a single flipped
bit in an rANS stream ruins the decode). See docs/bitstream.md.
"""

from __future__ import annotations

import math
import operator
import struct
import zlib
from dataclasses import dataclass
from typing import SupportsIndex

MAGIC = b"RDE"
VERSION = 1
PAD_MULTIPLE = 64
FINGERPRINT_LEN = 4
CRC_LEN = 4
MAX_UVARINT = 2**32 - 1
# magic + version + flags + fingerprint + steps + detail_scale + seed + y_hat_crc32
_FIXED_LEN = len(MAGIC) + 1 + 1 + FINGERPRINT_LEN + 1 + 4 + 4 + 4


class BitstreamError(ValueError):
    """A byte string is not a valid RDEIC bitstream; the message says why."""


class ModelMismatchError(BitstreamError):
    """The bitstream was written by a different model than the decoding codec."""


def _as_int(name: str, value: object, lo: int, hi: int) -> int:
    """Accept any integer-like value (numpy ints included) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, SupportsIndex):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def _to_f32(value: float) -> float:
    """Round to the f32 actually stored, so a Header compares equal after a round trip."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"detail_scale must be a number, got {value!r}") from None
    try:
        return struct.unpack(">f", struct.pack(">f", value))[0]
    except OverflowError:  # finite in f64 but not representable in f32
        return math.inf if value > 0 else -math.inf


def expected_z_shape(height: int, width: int) -> tuple[int, int]:
    """Hyper-latent grid of an image: the codec pads to PAD_MULTIPLE, z is at 1/64."""
    return (-(-height // PAD_MULTIPLE), -(-width // PAD_MULTIPLE))


def _semantic_problem(height: int, width: int, detail_scale: float, z_shape: tuple[int, int]) -> str | None:
    """Checks shared by writer (ValueError) and reader (BitstreamError)."""
    if height < 1 or width < 1:
        return f"image size must be at least 1x1, got {height}x{width}"
    if not math.isfinite(detail_scale):
        return f"detail scale must be finite, got {detail_scale}"
    want = expected_z_shape(height, width)
    if tuple(z_shape) != want:
        return (f"z grid {z_shape[0]}x{z_shape[1]} does not match image {height}x{width} "
                f"(expected ceil(H/{PAD_MULTIPLE}) x ceil(W/{PAD_MULTIPLE}) = {want[0]}x{want[1]})")
    return None


@dataclass(frozen=True)
class Header:
    """Decoded header fields; constructing one validates every value (ValueError)."""

    version: int
    fingerprint: bytes
    height: int
    width: int
    steps: int
    detail_scale: float
    seed: int
    z_shape: tuple[int, int]
    # CRC32 of the decoded latent ŷ (fixed-point), checked after entropy decoding: a decoder whose
    # entropy parameters drifted (another machine, another library version) fails loudly
    y_hat_crc32: int = 0

    def __post_init__(self) -> None:
        if self.version != VERSION:
            raise ValueError(f"this library writes bitstream version {VERSION}, got version {self.version!r}")
        if not isinstance(self.fingerprint, (bytes, bytearray)) or len(self.fingerprint) != FINGERPRINT_LEN:
            raise ValueError(f"fingerprint must be {FINGERPRINT_LEN} bytes, got {self.fingerprint!r}")
        fields = {
            "height": _as_int("height", self.height, 1, MAX_UVARINT),
            "width": _as_int("width", self.width, 1, MAX_UVARINT),
            "steps": _as_int("steps", self.steps, 0, 255),
            "seed": _as_int("seed", self.seed, 0, 2**32 - 1),
            "y_hat_crc32": _as_int("y_hat_crc32", self.y_hat_crc32, 0, 2**32 - 1),
            "fingerprint": bytes(self.fingerprint),
            "detail_scale": _to_f32(self.detail_scale),
        }
        if len(self.z_shape) != 2:
            raise ValueError(f"z_shape must be (z_h, z_w), got {self.z_shape!r}")
        fields["z_shape"] = tuple(_as_int("z_shape", v, 0, MAX_UVARINT) for v in self.z_shape)
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        problem = _semantic_problem(self.height, self.width, self.detail_scale, self.z_shape)
        if problem:
            raise ValueError(problem)

    @classmethod
    def create(cls, fingerprint: bytes, height: int, width: int, steps: int,
               detail_scale: float, seed: int, y_hat_crc32: int = 0) -> Header:
        """Header for a new image; accepts the 4-byte prefix or the full sha256 fingerprint."""
        if len(fingerprint) not in (FINGERPRINT_LEN, 32):
            raise ValueError(f"fingerprint must be 4 or 32 bytes, got {len(fingerprint)}")
        return cls(VERSION, bytes(fingerprint[:FINGERPRINT_LEN]), height, width, steps,
                   detail_scale, seed, expected_z_shape(height, width), y_hat_crc32)


def _uvarint(value: int) -> bytes:
    """Unsigned LEB128, minimal form."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _encode_header(h: Header, z_len: int, y_len: int) -> bytes:
    return b"".join([
        MAGIC, bytes([h.version, 0]), h.fingerprint,
        _uvarint(h.height), _uvarint(h.width),
        struct.pack(">BfII", h.steps, h.detail_scale, h.seed, h.y_hat_crc32),
        _uvarint(h.z_shape[0]), _uvarint(h.z_shape[1]), _uvarint(z_len), _uvarint(y_len),
    ])


def header_size(height: int, width: int, z_len: int, y_len: int) -> int:
    """Framing overhead in bytes: everything but the payloads (header fields + CRC)."""
    z_h, z_w = expected_z_shape(height, width)
    return _FIXED_LEN + CRC_LEN + sum(len(_uvarint(v)) for v in (height, width, z_h, z_w, z_len, y_len))


class _Reader:
    """Cursor over the stream that turns every short read into a BitstreamError."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int, field: str) -> bytes:
        if self.pos + n > len(self.data):
            raise BitstreamError(f"bitstream truncated: stream ends inside field '{field}' "
                                 f"(byte {self.pos}, {len(self.data)} bytes total)")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def uvarint(self, field: str) -> int:
        start, value = self.pos, 0
        for i in range(5):  # 5 * 7 bits >= 32 bits
            byte = self.take(1, field)[0]
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise BitstreamError(f"non-minimal uvarint encoding in field '{field}' at byte {start}")
                if value > MAX_UVARINT:
                    raise BitstreamError(f"field '{field}' = {value} does not fit in 32 bits")
                return value
        raise BitstreamError(f"uvarint in field '{field}' at byte {start} is longer than 5 bytes")


def _parse(data: bytes) -> tuple[Header, int, int, int]:
    """Validate a whole stream; returns (header, header_end, z_len, y_len)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"bitstream must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if data[:3] != MAGIC:
        if MAGIC.startswith(data):
            raise BitstreamError(f"bitstream truncated: only {len(data)} bytes, shorter than the magic")
        raise BitstreamError(f"not an RDEIC bitstream (magic {data[:3]!r}, expected {MAGIC!r})")
    r = _Reader(data)
    r.take(3, "magic")
    version = r.take(1, "version")[0]
    if version != VERSION:
        raise BitstreamError(f"unsupported bitstream version {version} (this library reads version {VERSION})")
    flags = r.take(1, "flags")[0]
    if flags:
        raise BitstreamError(f"unsupported flags 0x{flags:02x} (version {VERSION} defines none)")
    fingerprint = r.take(FINGERPRINT_LEN, "fingerprint")
    height, width = r.uvarint("height"), r.uvarint("width")
    steps, detail_scale, seed, y_hat_crc32 = struct.unpack(
        ">BfII", r.take(13, "steps/detail_scale/seed/y_hat_crc32"))
    z_shape = (r.uvarint("z_h"), r.uvarint("z_w"))
    z_len, y_len = r.uvarint("z_len"), r.uvarint("y_len")
    end, need = r.pos, z_len + y_len + CRC_LEN
    have = len(data) - end
    if have < need:
        raise BitstreamError(f"bitstream truncated: header declares {z_len + y_len} payload bytes "
                             f"+ {CRC_LEN} CRC bytes, only {have} present")
    if have > need:
        raise BitstreamError(f"trailing bytes after CRC: {have - need} extra byte(s)")
    stored = struct.unpack(">I", data[-CRC_LEN:])[0]
    computed = zlib.crc32(data[:-CRC_LEN])
    if stored != computed:
        raise BitstreamError(f"CRC mismatch: stored 0x{stored:08x}, computed 0x{computed:08x} "
                             "— the bitstream is corrupted")
    problem = _semantic_problem(height, width, detail_scale, z_shape)
    if problem is None and y_len == 0:
        problem = "empty y payload"
    if problem:
        raise BitstreamError(f"invalid bitstream: {problem}")
    header = Header(version, fingerprint, height, width, steps, detail_scale, seed, z_shape, y_hat_crc32)
    return header, end, z_len, y_len


@dataclass(frozen=True)
class Bitstream:
    """One encoded image: header plus the hyper-latent (z) and rANS (y) payloads."""

    header: Header
    z_payload: bytes
    y_payload: bytes

    def __post_init__(self) -> None:
        for name in ("z_payload", "y_payload"):
            value = getattr(self, name)
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise ValueError(f"{name} must be bytes, got {type(value).__name__}")
            object.__setattr__(self, name, bytes(value))
        if not self.y_payload:
            raise ValueError("y payload must not be empty")
        for name in ("z_payload", "y_payload"):
            if len(getattr(self, name)) > MAX_UVARINT:
                raise ValueError(f"{name} is longer than {MAX_UVARINT} bytes")

    def to_bytes(self) -> bytes:
        body = _encode_header(self.header, len(self.z_payload), len(self.y_payload))
        body += self.z_payload + self.y_payload
        return body + struct.pack(">I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> Bitstream:
        """Parse and fully validate; any malformed input raises BitstreamError."""
        header, end, z_len, _ = _parse(data)
        data = bytes(data)
        return cls(header, data[end:end + z_len], data[end + z_len:-CRC_LEN])


def peek_header(data: bytes) -> Header:
    """Header of a stream without copying payloads; the whole stream is still validated (CRC)."""
    return _parse(data)[0]


def check_fingerprint(header: Header, expected: bytes) -> None:
    """Raise ModelMismatchError unless the stream was written by the model `expected` (4 or 32 bytes)."""
    if len(expected) < FINGERPRINT_LEN:
        raise ValueError(f"expected fingerprint must be at least {FINGERPRINT_LEN} bytes, got {len(expected)}")
    want = bytes(expected[:FINGERPRINT_LEN])
    if header.fingerprint != want:
        raise ModelMismatchError(f"bitstream was written by model {header.fingerprint.hex()}, "
                                 f"this codec is {want.hex()}")


def bits_per_pixel(data: bytes, height: int, width: int) -> float:
    """Rate of the whole stream (header included) over the ORIGINAL, unpadded pixel count."""
    height = _as_int("height", height, 1, MAX_UVARINT)
    width = _as_int("width", width, 1, MAX_UVARINT)
    return 8 * len(data) / (height * width)
