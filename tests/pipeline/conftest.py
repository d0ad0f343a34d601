"""Shared fixtures for the archive pipeline: WebDataset shards of real photos plus hostile samples,
an S3 server on loopback (moto's ThreadedMotoServer, reached only through s3fs over HTTP), and the
real tiny RDEIC codec saved as a model directory.

``tests/jobs/conftest.py`` re-exports these fixtures; everything here is plain data or real
services, never a stand-in for our own code.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TEST_MAX_PIXELS = 16 * 1024 * 1024


# ------------------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class Expect:
    """What the archive must say about one sample."""

    status: str
    reason: str | None = None
    mode: str | None = None
    size: tuple[int, int] | None = None  # (width, height) as encoded
    exif_orientation: int | None = None


@dataclass
class ShardSpec:
    """A shard's samples (key -> {ext: bytes}) in tar order, and the expected outcome per key."""

    name: str
    samples: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    expect: dict[str, Expect] = field(default_factory=dict)

    def add(self, key: str, members: dict[str, bytes], expect: Expect) -> None:
        self.samples.append((key, members))
        self.expect[key] = expect

    def tar_bytes(self) -> bytes:
        return tar_of(self.samples)


def tar_of(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A WebDataset tar: members ``<key>.<ext>`` grouped by sample, in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member_data_offset(tar: bytes, member_name: str) -> tuple[int, int]:
    """(offset of the member's data, its size) inside an uncompressed tar."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        info = tf.getmember(member_name)
        return info.offset_data, info.size


def encode_image(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's signature)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> tuple[bytes, tuple[int, int]]:
    """A 48x24 JPEG tagged orientation 6 (displayed rotated 90 degrees): (bytes, upright (w, h))."""
    img = Image.new("RGB", (48, 24))
    img.paste((200, 30, 30), (0, 0, 24, 24))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode_image(img, "JPEG", exif=exif.tobytes(), quality=90), (24, 48)


def hostile_samples(photo: Image.Image) -> dict[str, tuple[dict[str, bytes], Expect]]:
    """Every kind of awkward sample the archive must account for, keyed by sample key."""
    jpeg = encode_image(photo, "JPEG", quality=90)
    w, h = photo.size
    rotated, upright = exif_rotated_jpeg()
    rgb16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    return {
        "truncated_jpeg": ({"jpg": jpeg[: len(jpeg) // 2]}, Expect("failed", "truncated_image")),
        "zero_bytes": ({"jpg": b""}, Expect("failed", "empty_file")),
        "text_as_jpg": ({"jpg": b"this is a text file, not a JPEG\n" * 4}, Expect("failed", "not_an_image")),
        "cmyk_jpeg": ({"jpg": encode_image(photo.convert("CMYK"), "JPEG", quality=90)},
                      Expect("ok", mode="CMYK", size=(w, h))),
        "png16": ({"png": encode_image(Image.fromarray(rgb16), "PNG")}, Expect("ok", mode="I;16", size=(w, h))),
        "rgba": ({"png": encode_image(rgba, "PNG")}, Expect("ok", mode="RGBA", size=(w, h))),
        "palette": ({"png": encode_image(photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG")},
                    Expect("ok", mode="P", size=(w, h))),
        "one_pixel": ({"png": encode_image(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")},
                      Expect("ok", mode="RGB", size=(1, 1))),
        "exif_rotated": ({"jpg": rotated}, Expect("ok", mode="RGB", size=upright, exif_orientation=6)),
        "bomb": ({"png": png_header_only(40_000, 40_000)}, Expect("failed", "too_large")),
        "over_limit": ({"png": png_header_only(5_000, 5_000)}, Expect("failed", "too_large")),
        "caption_only": ({"txt": b"a caption without its image", "json": b"{}"}, Expect("failed", "no_image")),
    }


def build_shard_specs(photo_paths: list[Path], n_shards: int, photos_per_shard: int,
                      with_hostile: bool = True) -> list[ShardSpec]:
    """Shards ``shard-00000i`` of real photos (PNG and JPEG, with .json/.cls side members); the
    hostile samples are dealt round-robin over the shards."""
    specs = [ShardSpec(f"shard-{i:06d}") for i in range(n_shards)]
    photos = [Image.open(p).convert("RGB") for p in photo_paths[: n_shards * photos_per_shard]]
    if len(photos) < n_shards * photos_per_shard:
        raise RuntimeError(f"need {n_shards * photos_per_shard} photos, have {len(photos)}")
    for i, (path, img) in enumerate(zip(photo_paths, photos)):
        spec = specs[i // photos_per_shard]
        as_jpeg = i % 2 == 1
        data = encode_image(img, "JPEG", quality=92) if as_jpeg else Path(path).read_bytes()
        key = f"photo{i:03d}"
        spec.add(key, {"jpg" if as_jpeg else "png": data, "json": b'{"source": "%s"}' % path.name.encode(),
                       "cls": str(i % 3).encode()},
                 Expect("ok", mode="RGB", size=img.size))
    if with_hostile:
        for j, (key, (members, expect)) in enumerate(hostile_samples(photos[0]).items()):
            specs[j % n_shards].add(key, members, expect)
    return specs


# ------------------------------------------------------------------------------------- codec
# s3_server, tiny_model_dir, other_model_dir and ray_address live in tests/conftest.py: one
# definition each, so every folder shares one moto server and one Ray per session.
@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_dir: Path):
    """The tiny codec loaded once on CPU (float32), through the same adapter the jobs use."""
    import torch

    from jobs.codec import RDEICEncoderFactory

    torch.set_num_threads(1)
    return RDEICEncoderFactory(str(tiny_model_dir)).load("cpu")


@pytest.fixture(scope="session")
def shard_specs(small_photo_paths: list[Path]) -> list[ShardSpec]:
    """Three shards: 12 real photos plus every hostile sample."""
    return build_shard_specs(small_photo_paths, n_shards=3, photos_per_shard=4)
