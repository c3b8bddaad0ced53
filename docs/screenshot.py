"""
Take the README's screenshots of the chat page in use: two browser users and one terminal user.

Run from anywhere after ``pip install '.[test]'`` (needs Debian's chromium):

    python docs/screenshot.py

Writes docs/screenshot.png (a desktop window) and docs/screenshot-phone.png (a phone), then
prints the daemon's /metrics.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from playwright.sync_api import Page, expect, sync_playwright

HERE = Path(__file__).resolve().parent
# The daemon, client and Chromium helpers are the browser tests' own.
sys.path.insert(0, str(HERE.parent / "tests"))
from browser import ClientProcess, DaemonProcess, launchChromium  # noqa: E402


def say(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")
    expect(page.locator("#log li.msg.own .bubble").last).to_have_text(text)
    expect(page.locator("#log li.pending")).to_have_count(0)  # relayed, no longer dimmed


def main() -> None:
    cwd = Path(tempfile.mkdtemp())
    with DaemonProcess(cwd=cwd) as daemon, sync_playwright() as playwright:
        browser = launchChromium(playwright)
        desktop = browser.new_page(viewport={"width": 900, "height": 560})
        desktop.goto(daemon.httpURL)
        expect(desktop.locator("#state")).to_have_text("connected")
        phone = browser.new_context(
            viewport={"width": 390, "height": 700}, device_scale_factor=2, is_mobile=True
        ).new_page()
        phone.goto(daemon.httpURL)
        expect(phone.locator("#state")).to_have_text("connected")
        terminal = ClientProcess(daemon.url, cwd=cwd)
        terminal.output.next()
        expect(desktop.locator("#online")).to_have_text("3 online")

        say(desktop, "Morning! Is the release build green?")
        say(phone, "Yes, all tests pass. Tagging it now.")
        terminal.send("deploying from the terminal, back in 5")
        say(desktop, "Great. And <b>markup</b> stays plain text, as it should.")
        say(phone, "See you after the deploy!")
        expect(desktop.locator("#log li.msg")).to_have_count(5)
        expect(phone.locator("#log li.msg")).to_have_count(5)
        desktop.locator("#text").fill("")
        desktop.screenshot(path=str(HERE / "screenshot.png"))
        phone.screenshot(path=str(HERE / "screenshot-phone.png"))
        terminal.close()
        browser.close()
        print(daemon.get("/metrics").decode("utf-8"))


if __name__ == "__main__":
    main()
