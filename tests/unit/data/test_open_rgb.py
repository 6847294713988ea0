"""Decoding: every PIL image mode becomes RGB."""

from __future__ import annotations

import pytest
from PIL import Image

from tlray.data.pipeline import open_rgb


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_every_image_mode_decodes_to_rgb(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    Image.new(mode, (5, 3)).save(path)
    image = open_rgb(str(path))
    assert image.mode == "RGB" and image.size == (5, 3)


def test_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("P", (4, 4), color) for color in (1, 2)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert open_rgb(str(tmp_path / "a.gif")).size == (4, 4)
