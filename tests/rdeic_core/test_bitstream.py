"""Tests of the v1 bitstream container: round trips, and that no corruption goes unnoticed."""

from __future__ import annotations

import math
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdeic_core.bitstream import (
    MAGIC,
    PAD_MULTIPLE,
    Bitstream,
    BitstreamError,
    Header,
    ModelMismatchError,
    bits_per_pixel,
    check_fingerprint,
    header_size,
    peek_header,
)

FP = bytes.fromhex("1a2b3c4d")


def make(height: int = 40, width: int = 70, z: bytes = b"zz", y: bytes = b"yyy", **kw) -> Bitstream:
    args = dict(fingerprint=FP, height=height, width=width, steps=2, detail_scale=1.0, seed=231)
    args.update(kw)
    return Bitstream(Header.create(**args), z, y)


def recrc(body: bytes) -> bytes:
    """Re-seal a hand-edited stream so that only the semantic checks can catch it."""
    return body + struct.pack(">I", zlib.crc32(body))


headers = st.builds(
    Header.create,
    fingerprint=st.binary(min_size=4, max_size=4),
    height=st.integers(1, 2**32 - 1),
    width=st.integers(1, 2**32 - 1),
    steps=st.integers(0, 255),
    detail_scale=st.floats(-1e30, 1e30, allow_nan=False),
    seed=st.integers(0, 2**32 - 1),
)


@settings(max_examples=300, deadline=None)
@given(headers, st.binary(max_size=300), st.binary(min_size=1, max_size=3000))
def test_round_trip(header: Header, z: bytes, y: bytes) -> None:
    data = Bitstream(header, z, y).to_bytes()
    back = Bitstream.from_bytes(data)
    assert back == Bitstream(header, z, y)
    assert peek_header(data) == header
    assert len(data) == header_size(header.height, header.width, len(z), len(y)) + len(z) + len(y)


def test_layout_is_as_documented() -> None:
    data = make(height=512, width=768, z=b"Z" * 3, y=b"Y" * 5, detail_scale=0.5, seed=0x01020304,
                y_hat_crc32=0xA1B2C3D4).to_bytes()
    assert data[:3] == b"RDE" and data[3] == 1 and data[4] == 0 and data[5:9] == FP
    assert data[9:13] == bytes([0x80, 0x04, 0x80, 0x06])  # 512, 768 as LEB128
    assert data[13:22] == bytes([2]) + struct.pack(">f", 0.5) + bytes([1, 2, 3, 4])
    assert data[22:26] == struct.pack(">I", 0xA1B2C3D4)  # y_hat_crc32
    assert data[26:30] == bytes([8, 12, 3, 5])  # z_h, z_w, z_len, y_len
    assert data[30:38] == b"ZZZYYYYY"
    assert data[38:] == struct.pack(">I", zlib.crc32(data[:38]))


def test_detail_scale_stored_as_f32() -> None:
    bs = make(detail_scale=0.1)
    assert bs.header.detail_scale == struct.unpack(">f", struct.pack(">f", 0.1))[0]
    assert Bitstream.from_bytes(bs.to_bytes()) == bs


def test_every_single_byte_mutation_is_detected() -> None:
    data = make(height=100, width=130).to_bytes()
    for pos in range(len(data)):
        for value in range(256):
            if value == data[pos]:
                continue
            bad = data[:pos] + bytes([value]) + data[pos + 1:]
            with pytest.raises(BitstreamError):
                Bitstream.from_bytes(bad)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_mutation_of_large_stream(data: st.DataObject) -> None:
    stream = make(height=512, width=768, z=bytes(168), y=bytes(range(256)) * 4).to_bytes()
    pos = data.draw(st.integers(0, len(stream) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != stream[pos]))
    with pytest.raises(BitstreamError):
        Bitstream.from_bytes(stream[:pos] + bytes([value]) + stream[pos + 1:])


def test_every_truncation_is_detected() -> None:
    data = make().to_bytes()
    for n in range(len(data)):
        with pytest.raises(BitstreamError, match="truncated"):
            Bitstream.from_bytes(data[:n])
        with pytest.raises(BitstreamError):
            peek_header(data[:n])


@pytest.mark.parametrize("extra", [b"\x00", b"abc", bytes(100)])
def test_appended_bytes_are_rejected(extra: bytes) -> None:
    with pytest.raises(BitstreamError, match="trailing bytes after CRC"):
        Bitstream.from_bytes(make().to_bytes() + extra)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_bitstream_error(garbage: bytes) -> None:
    with pytest.raises(BitstreamError):
        Bitstream.from_bytes(garbage)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=60))
def test_garbage_behind_valid_prefix_raises_bitstream_error(tail: bytes) -> None:
    with pytest.raises(BitstreamError):
        Bitstream.from_bytes(MAGIC + b"\x01\x00" + tail)


def test_error_messages_name_the_problem() -> None:
    data = make().to_bytes()
    with pytest.raises(BitstreamError, match=r"not an RDEIC bitstream \(magic b'\\x89PN'"):
        Bitstream.from_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(BitstreamError, match=r"unsupported bitstream version 7 \(this library reads version 1\)"):
        Bitstream.from_bytes(data[:3] + b"\x07" + data[4:])
    with pytest.raises(BitstreamError, match="unsupported flags"):
        Bitstream.from_bytes(data[:4] + b"\x01" + data[5:])
    with pytest.raises(BitstreamError, match=r"declares 5 payload bytes \+ 4 CRC bytes, only 7 present"):
        Bitstream.from_bytes(data[:-2])
    stored = struct.unpack(">I", data[-4:])[0]
    bad = data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]
    computed = zlib.crc32(bad[:-4])
    with pytest.raises(BitstreamError, match=f"CRC mismatch: stored 0x{stored:08x}, computed 0x{computed:08x}"):
        Bitstream.from_bytes(bad)


def test_check_order_magic_before_version_before_flags() -> None:
    data = make().to_bytes()
    with pytest.raises(BitstreamError, match="not an RDEIC"):
        Bitstream.from_bytes(b"XYZ\x07\x01" + data[5:])
    with pytest.raises(BitstreamError, match="version 7"):
        Bitstream.from_bytes(data[:3] + b"\x07\x01" + data[5:])
    with pytest.raises(BitstreamError, match="CRC mismatch"):  # CRC before semantic checks
        Bitstream.from_bytes(data[:20] + b"\x09" + data[21:])  # byte 20 is z_h
    with pytest.raises(BitstreamError, match="unsupported flags"):  # flags before truncation
        Bitstream.from_bytes(data[:4] + b"\x01" + data[5:9])


def _body(height: int, width: int, z_shape: tuple[int, int], y: bytes, scale: float = 1.0) -> bytes:
    """Hand-built v1 body (no CRC), bypassing the writer's validation."""
    def uv(v: int) -> bytes:
        out = bytearray()
        while True:
            b, v = v & 0x7F, v >> 7
            out.append(b | (0x80 if v else 0))
            if not v:
                return bytes(out)
    return (MAGIC + b"\x01\x00" + FP + uv(height) + uv(width) + struct.pack(">BfII", 2, scale, 0, 0)
            + uv(z_shape[0]) + uv(z_shape[1]) + uv(0) + uv(len(y)) + y)


@pytest.mark.parametrize(
    "body, message",
    [
        (_body(64, 64, (2, 1), b"y"), r"z grid 2x1 does not match image 64x64 .* = 1x1"),
        (_body(65, 64, (1, 1), b"y"), r"z grid 1x1 does not match image 65x64 .* = 2x1"),
        (_body(0, 64, (0, 1), b"y"), "image size must be at least 1x1"),
        (_body(64, 64, (1, 1), b""), "empty y payload"),
        (_body(64, 64, (1, 1), b"y", math.nan), "detail scale must be finite"),
        (_body(64, 64, (1, 1), b"y", math.inf), "detail scale must be finite"),
    ],
)
def test_semantic_checks(body: bytes, message: str) -> None:
    with pytest.raises(BitstreamError, match=message):
        Bitstream.from_bytes(recrc(body))


def test_uvarint_rules() -> None:
    ok = _body(64, 64, (1, 1), b"y")
    assert Bitstream.from_bytes(recrc(ok)).header.height == 64
    non_minimal = ok[:9] + b"\xc0\x00" + ok[10:]  # 64 as two bytes
    with pytest.raises(BitstreamError, match="non-minimal uvarint encoding in field 'height'"):
        Bitstream.from_bytes(recrc(non_minimal))
    too_big = ok[:9] + b"\x80\x80\x80\x80\x10" + ok[10:]  # 2**32
    with pytest.raises(BitstreamError, match="does not fit in 32 bits"):
        Bitstream.from_bytes(recrc(too_big))
    too_long = ok[:9] + b"\x80\x80\x80\x80\x81\x01" + ok[10:]
    with pytest.raises(BitstreamError, match="longer than 5 bytes"):
        Bitstream.from_bytes(recrc(too_long))


def test_fingerprint_mismatch_names_both() -> None:
    header = make().header
    check_fingerprint(header, FP)
    check_fingerprint(header, FP + bytes(28))  # full sha256 digest also accepted
    with pytest.raises(ModelMismatchError, match="written by model 1a2b3c4d, this codec is 99887766") as info:
        check_fingerprint(header, bytes.fromhex("99887766") + bytes(28))
    assert isinstance(info.value, BitstreamError)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(height=0), "height"),
        (dict(width=-1), "width"),
        (dict(height=2**32), "height"),
        (dict(steps=256), "steps"),
        (dict(steps=-1), "steps"),
        (dict(seed=2**32), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(detail_scale=math.nan), "finite"),
        (dict(detail_scale=math.inf), "finite"),
        (dict(detail_scale=1e39), "finite"),  # finite in f64, overflows f32
        (dict(fingerprint=b"abc"), "fingerprint"),
        (dict(fingerprint=bytes(5)), "fingerprint"),
        (dict(y=b""), "y payload"),
    ],
)
def test_invalid_write_values_raise_value_error(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        make(**kw)
    assert not isinstance(info.value, BitstreamError)


def test_header_constructor_validates_shape_and_version() -> None:
    with pytest.raises(ValueError, match="z grid"):
        Header(1, FP, 64, 64, 2, 1.0, 0, (2, 2))
    with pytest.raises(ValueError, match="version"):
        Header(2, FP, 64, 64, 2, 1.0, 0, (1, 1))
    with pytest.raises(ValueError, match="fingerprint"):
        Header(1, bytes(32), 64, 64, 2, 1.0, 0, (1, 1))


def test_z_shape_follows_padding() -> None:
    assert PAD_MULTIPLE == 64
    assert make(height=64, width=65).header.z_shape == (1, 2)
    assert make(height=1, width=1).header.z_shape == (1, 1)
    assert make(height=512, width=768).header.z_shape == (8, 12)


@pytest.mark.parametrize("y_len", [100, 330, 1000, 5000, 16383])
def test_overhead_for_kodak_size(y_len: int) -> None:
    z_len = 168  # 8x12 indices at 14 bits
    bs = make(height=512, width=768, z=bytes(z_len), y=bytes(y_len))
    overhead = len(bs.to_bytes()) - z_len - y_len
    assert overhead == header_size(512, 768, z_len, y_len)
    assert overhead <= 36


def test_bits_per_pixel_uses_original_size() -> None:
    data = make(height=100, width=50).to_bytes()
    assert bits_per_pixel(data, 100, 50) == pytest.approx(8 * len(data) / 5000)
    assert bits_per_pixel(data, 100, 50) > 8 * len(data) / (128 * 64)  # not the padded size
    with pytest.raises(ValueError):
        bits_per_pixel(data, 0, 50)


def test_non_bytes_input() -> None:
    with pytest.raises(BitstreamError):
        Bitstream.from_bytes("RDE")  # type: ignore[arg-type]
    data = bytearray(make().to_bytes())
    assert Bitstream.from_bytes(data) == Bitstream.from_bytes(bytes(data))
