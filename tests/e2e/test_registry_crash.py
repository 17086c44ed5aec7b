"""Registry crash safety: a publisher is `kill -9`'d at random moments, again and again.

Afterwards every version the registry lists must verify, its manifest must name it, every
alias must point at a listed version, and a new publish must still work (no stuck lock).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from slimserve.registry.store import Registry

# Publishes versions of "m" forever: several files per version (written, checksummed and
# fsynced by `publish`), then moves the "production" alias to the new version.
PUBLISHER = """
import os, sys
from slimserve.registry.store import Registry
reg = Registry(sys.argv[1])
rng = os.urandom
while True:
    with reg.staging() as staged:
        for i in range(4):
            (staged / f"shard-{i}.safetensors").write_bytes(rng(128 * 1024))
        (staged / "sub").mkdir()
        (staged / "sub" / "config.json").write_text('{"layers": 2}')
        art = reg.publish("m", staged, {"parent": None, "dtype": "float32"})
    reg.set_alias("m", "production", art.version)
    print(art.version, flush=True)
"""


def _check(reg: Registry) -> list[int]:
    versions = reg.versions("m")
    for v in versions:
        art = reg.get("m", str(v))
        art.verify()  # every listed file present with its size and sha256, nothing extra
        assert art.manifest["version"] == v and art.manifest["name"] == "m"
        assert len(art.files) == 5
    for alias, target in reg.aliases("m").items():
        assert target in versions, f"alias {alias} -> {target}, which is not a whole version"
    base = reg.root / "m"
    for entry in base.iterdir():
        # Only whole versions, the alias file, the lock, and atomic-write temporaries
        # (hidden, never read) may exist beside each other.
        ok = {"aliases.json", ".lock"}
        assert entry.name.isdigit() or entry.name in ok or entry.name.startswith(".aliases.json.")
    return versions


def test_publish_killed_at_random_moments_leaves_only_whole_versions(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    rng = random.Random(20261128)
    kills_mid_publish = 0
    staging = reg.root / ".staging"
    left: set[str] = set()
    for _ in range(10):
        proc = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, str(reg.root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(rng.uniform(0.15, 0.8))  # ~0.1 s of imports, then publishing
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err.decode()
        now = {p.name for p in staging.iterdir()} if staging.is_dir() else set()
        kills_mid_publish += bool(now - left)  # a new half-built version was left behind
        left = now
        _check(reg)
    versions = _check(reg)
    assert len(versions) >= 5, "the publisher hardly ran: the kills proved nothing"
    assert versions == list(range(1, len(versions) + 1))  # no gaps, no half numbers
    assert kills_mid_publish >= 3, f"only {kills_mid_publish} kills landed mid-publish"
    print(f"{len(versions)} versions published, {kills_mid_publish} of 10 kills mid-publish")
    # The lock died with its holder: the next publish takes the next number.
    with reg.staging() as staged:
        (staged / "w.safetensors").write_bytes(b"after the crashes")
        assert reg.publish("m", staged, {"parent": None}).version == versions[-1] + 1
