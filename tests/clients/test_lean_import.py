import subprocess
import sys


def test_importing_the_client_does_not_import_torch() -> None:
    code = (
        "import sys, slimserve.clients, slimserve.cli\n"
        "bad = [m for m in ('torch', 'transformers', 'slimserve.server', 'slimserve.compression',"
        " 'slimserve.engine', 'slimserve.registry')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
