"""The image endpoint's pixel rule is the server's own, not Pillow's: a JPEG counts after its 1/8
draft reduction even where the full size is past Pillow's decompression-bomb limit, and any other
image past that limit is the server's 413 naming its limit, not Pillow's text."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from prism_trt.model.spec import ViTSpec
from prism_trt.serve.protocol import decode_image, max_image_pixels
from prism_trt.serve.request_error import RequestError

SPEC = ViTSpec(name="pixel-rule", img_size=(28, 28), patch_size=(7, 7), in_chans=1, num_prefix_tokens=1,
               embed_dim=8, depth=1, num_heads=1, head_dim=8, mlp_hidden_dim=16, mlp_act="gelu", norm_eps=1e-6,
               qkv_bias=True, pre_norm=False, final_norm=True, pool="token", fc_norm=False, num_classes=10,
               mean=(0.5,), std=(0.5,))
PILLOW_BOMB_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # Pillow refuses above this at open


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose valid header declares ``width`` x ``height`` and that holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_a_png_past_pillows_bomb_limit_is_the_servers_413_naming_its_limit():
    side = 14_000
    assert side * side > PILLOW_BOMB_PIXELS
    with pytest.raises(RequestError) as info:
        decode_image(png_header_only(side, side), SPEC)
    assert (info.value.status, info.value.reason) == (413, "image_too_large"), info.value.message
    assert f"at most {max_image_pixels(SPEC)} pixels" in info.value.message
    assert "decompression bomb" not in info.value.message


def test_a_16000_square_jpeg_is_admitted_by_its_reduced_size():
    side = 16_000
    photo = Image.new("L", (side, side), 200)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=50)
    del photo
    assert side * side > PILLOW_BOMB_PIXELS and (side // 8) ** 2 <= max_image_pixels(SPEC)
    image = decode_image(buffer.getvalue(), SPEC)
    assert image.shape == (1, 1, 28, 28)
    assert float(image.float().mean()) == pytest.approx(200, abs=2.5)
