"""The pictures (pictures.py): a heatmap draws each cell in its colour and grows with the tasks.

Run: python -m pytest tests/test_pictures.py -q
"""
from PIL import Image

import pictures


def test_heatmap_draws_each_cell_in_its_colour():
    tasks = ["classify", "attribute", "count"]
    img = pictures.heatmap(tasks, [[0, 100, 50], [100, 0, 50], [50, 50, 100]], "title")
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    wide = pictures.heatmap(tasks + ["read"], [[0] * 4] * 4)
    assert wide.size[0] > img.size[0] and wide.size[1] > img.size[1]  # one more task: one more row and column
    cell, left, top = 44, 110, 40  # the layout heatmap() draws with

    def corner(i, j):  # a pixel of cell (i, j) away from its printed number
        return img.getpixel((left + j * cell + 3, top + i * cell + 3))
    assert corner(0, 0) == corner(1, 1) == (255, 255, 255)   # 0 %: white
    assert corner(0, 1) == corner(1, 0) == (40, 145, 60)     # 100 %: dark green
    assert sum(corner(0, 0)) > sum(corner(0, 2)) > sum(corner(0, 1))  # 50 % is in between
