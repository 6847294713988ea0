"""The browser helper itself: what it reports about pages whose content is known exactly."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from browser import PageCheck, Table, blank


def write_page(folder: Path, body: str, title: str = "") -> Path:
    page = folder / "page.html"
    page.write_text(f"<!doctype html><html><head><title>{title}</title></head><body>{body}</body></html>")
    return page


def test_images_tables_and_title_of_a_page(browser, tmp_path: Path):
    image = Image.new("RGB", (40, 30), (220, 40, 40))
    image.paste((40, 60, 220), (0, 0, 20, 30))  # two colours
    image.save(tmp_path / "plot.png")
    rows = "".join(f"<tr><td>run-{n}</td><td>{n / 10}</td></tr>" for n in range(3))
    table = f"<table id='runs'><thead><tr><th>run</th><th>loss</th></tr></thead><tbody>{rows}</tbody></table>"
    page = write_page(tmp_path, f"<h1>Runs</h1><img src='plot.png'>{table}", title="Run report")

    check = browser.check(page, width=640, height=480)

    assert check.title == "Run report"
    assert check.images == [("plot.png", 40)]
    assert check.broken_images() == []
    assert check.tables == [Table(id="runs", header=["run", "loss"], rows=3, first_cells=["run-0", "run-1", "run-2"])]
    assert check.table("runs").rows == 3
    assert Image.open(BytesIO(check.screenshot)).size == (640, 480)
    assert not blank(check.screenshot)


def test_a_missing_image_is_broken(browser, tmp_path: Path):
    check = browser.check(write_page(tmp_path, "<p>plot:</p><img src='missing.png'>"))

    assert check.images == [("missing.png", 0)]
    assert check.broken_images() == ["missing.png"]


def test_links_an_offline_reader_cannot_follow_are_broken(browser, tmp_path: Path):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "index.html").write_text("<p>run a</p>")
    links = [
        "<a href='#here'>here</a>",  # an anchor on the page
        "<a href='#gone'>gone</a>",  # an anchor that is not
        "<a href='runs/a/index.html'>a</a>",  # a relative link to a file that exists
        "<a href='runs/b/index.html'>b</a>",  # ... and to one that does not
        "<a href='https://example.com/report.html'>web</a>",  # not offline
    ]
    check = browser.check(write_page(tmp_path, "<h2 id='here'>x</h2>" + "".join(links)))
    assert [href for href, _, _ in check.links] == [
        "#here",
        "#gone",
        "runs/a/index.html",
        "runs/b/index.html",
        "https://example.com/report.html",
    ]
    assert check.broken_links() == ["#gone", "runs/b/index.html", "https://example.com/report.html"]


def test_an_empty_page_is_blank(browser, tmp_path: Path):
    check = browser.check(write_page(tmp_path, ""))

    assert blank(check.screenshot)
    assert (check.title, check.images, check.tables) == ("", [], [])


def test_the_screenshot_covers_the_whole_page(browser, tmp_path: Path):
    check = browser.check(write_page(tmp_path, "<div style='height: 2500px'>tall</div>"), width=500, height=400)

    width, height = Image.open(BytesIO(check.screenshot)).size
    assert width == 500
    assert 2500 <= height < 2600  # the div and the body's margins


def test_asking_for_a_table_that_is_not_there_names_those_that_are():
    check = PageCheck(title="", images=[], tables=[Table("a", [], 0, []), Table("b", [], 0, [])], screenshot=b"")

    with pytest.raises(KeyError, match=r"'c'.*\['a', 'b'\]"):
        check.table("c")
