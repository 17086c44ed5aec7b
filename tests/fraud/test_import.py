from __future__ import annotations

import subprocess
import sys


def test_importing_the_fraud_example_stays_light() -> None:
    code = (
        "import sys, slimserve.fraud\n"
        "heavy = ('torch', 'transformers', 'sklearn', 'matplotlib', 'slimserve.server',"
        " 'slimserve.compression', 'slimserve.engine')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )

    assert result.returncode == 0, result.stderr
