"""A package index on the local disk, made from ``uv.lock`` alone, for pip to install from.

Each registry ``[[package]]`` of the lock becomes an empty wheel (``py3-none-any``: a
``.dist-info`` folder and nothing else) with the locked name and version, and the
dependencies the lock records for it as ``Requires-Dist``, extras and markers included
(optional dependencies under ``extra == ...``, with ``Provides-Extra``), and *no* version
bound. Real metadata bounds its dependencies at least as tightly, so an index where every
dependency accepts any version is the worst case for "a newer release changes what pip
picks".

The wheels lie in a PEP 503 layout (``ROOT/<name>/index.html``) that pip reads through a
``file://`` index URL. :func:`rehash` rewrites a copy of an export so that its ``--hash``
lines name those wheels; :meth:`LocalIndex.plant_newer` adds a release of every locked
package that the lock does not know, as the public index gains them after a lock is made.
Nothing is downloaded: :func:`pip` runs pip with no configuration file, no ``PIP_*``
variable, and proxies that point at a closed port.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest's own dependency on 3.10
    import tomli as tomllib

#: a requirement line of an export: ``name[extras]==version ; marker \``
REQUIREMENT = re.compile(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;\\]+)")
HASH = re.compile(r"^\s*--hash=sha256:([0-9a-f]{64})\s*\\?\s*$")
#: the version of every planted release: newer than anything locked.
NEWER = "2099.1.0"


@dataclass(frozen=True)
class Package:
    """One ``[[package]]`` of the lock: what its wheel's METADATA says."""

    name: str
    version: str
    requires: tuple[str, ...]
    extras: tuple[str, ...]


def _requirement(dep: dict, extra: str | None = None) -> str:
    """``Requires-Dist`` value of one lock dependency (any version: the lock records no bound)."""
    name = dep["name"] + (f"[{','.join(dep['extra'])}]" if dep.get("extra") else "")
    markers = [f"({dep['marker']})"] if dep.get("marker") else []
    if extra:
        markers.append(f"extra == '{extra}'")
    return name + (f" ; {' and '.join(markers)}" if markers else "")


def locked_packages(lock: Path) -> list[Package]:
    """Every registry package of ``lock`` (the project itself, editable, is left out)."""
    out = []
    for p in tomllib.loads(lock.read_text())["package"]:
        if "registry" not in p["source"]:
            continue
        requires = [_requirement(d) for d in p.get("dependencies", [])]
        optional = p.get("optional-dependencies", {})
        requires += [_requirement(d, extra) for extra, deps in optional.items() for d in deps]
        # A dependency the lock splits by marker (numpy 2.2.6 / 2.4.6 ...) is one line per marker.
        out.append(Package(p["name"], p["version"], tuple(dict.fromkeys(requires)), tuple(optional)))
    return out


def locked_hashes(lock: Path) -> dict[tuple[str, str], set[str]]:
    """``{(name, version): sha256s}`` of the files (wheels and sdist) the lock records."""
    out: dict[tuple[str, str], set[str]] = {}
    for p in tomllib.loads(lock.read_text())["package"]:
        files = [*p.get("wheels", []), *([p["sdist"]] if "sdist" in p else [])]
        out[(canonicalize_name(p["name"]), p["version"])] = {f["hash"].removeprefix("sha256:") for f in files}
    return out


def _write_wheel(folder: Path, package: Package) -> Path:
    stem = f"{canonicalize_name(package.name).replace('-', '_')}-{package.version}"
    info = f"{stem}.dist-info"
    metadata = ["Metadata-Version: 2.1", f"Name: {package.name}", f"Version: {package.version}"]
    metadata += [f"Provides-Extra: {e}" for e in package.extras]
    metadata += [f"Requires-Dist: {r}" for r in package.requires]
    files = {
        f"{info}/METADATA": "\n".join(metadata) + "\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: fruitdask-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            # A fixed date: the same package gives the same bytes, hence the same hash.
            whl.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), text)
    return path


@dataclass
class LocalIndex:
    """Empty wheels of a lock's packages under ``root``, one PEP 503 page per project."""

    root: Path
    lock: Path
    #: ``{(name, version): sha256}`` of every wheel written, planted ones included.
    shas: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def add(self, package: Package) -> None:
        folder = self.root / canonicalize_name(package.name)
        folder.mkdir(parents=True, exist_ok=True)
        wheel = _write_wheel(folder, package)
        self.shas[(canonicalize_name(package.name), package.version)] = hashlib.sha256(wheel.read_bytes()).hexdigest()
        links = "".join(f'<a href="{html.escape(w.name)}">{html.escape(w.name)}</a><br>\n' for w in sorted(folder.glob("*.whl")))
        (folder / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")

    def plant_newer(self, version: str = NEWER) -> list[str]:
        """A release ``version`` of every locked package, with its newest locked dependencies."""
        newest: dict[str, Package] = {}
        for p in locked_packages(self.lock):
            name = canonicalize_name(p.name)
            if name not in newest or Version(p.version) > Version(newest[name].version):
                newest[name] = p
        for p in newest.values():
            assert Version(version) > Version(p.version), (p.name, p.version)
            self.add(Package(p.name, version, p.requires, p.extras))
        return sorted(newest)


def build_index(root: Path, lock: Path) -> LocalIndex:
    """An empty wheel for every registry package of ``lock``, under ``root``."""
    index = LocalIndex(root, lock)
    for package in locked_packages(lock):
        index.add(package)
    return index


def rehash(export: str, shas: dict[tuple[str, str], str]) -> str:
    """``export`` with each requirement's hashes replaced by the one of its empty wheel."""
    out: list[str] = []
    for line in export.splitlines():
        if HASH.match(line):
            continue  # the real files' hashes; the requirement line above now carries ours
        m = REQUIREMENT.match(line)
        if m:
            sha = shas[(canonicalize_name(m.group(1)), m.group(3))]
            line = line.rstrip(" \\") + f" \\\n    --hash=sha256:{sha}"
        out.append(line)
    return "\n".join(out) + "\n"


def pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m pip ARGS`` with no configuration file, no ``PIP_*`` variable and no network.

    The proxies point at a closed port on loopback: a request for anything but a
    ``file://`` URL fails at once instead of reaching an index.
    """
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PIP_") and "PROXY" not in k.upper()}
    unreachable = "http://127.0.0.1:9"
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    env.update(HTTP_PROXY=unreachable, HTTPS_PROXY=unreachable, ALL_PROXY=unreachable, NO_PROXY="")
    env.update(http_proxy=unreachable, https_proxy=unreachable, all_proxy=unreachable, no_proxy="")
    cmd = [sys.executable, "-m", "pip", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
