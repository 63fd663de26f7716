"""colar_core is a plain library: importing any of it pulls in neither Prefect nor MLflow."""

import subprocess
import sys


def test_colar_core_imports_neither_prefect_nor_mlflow():
    code = (
        "import pkgutil, sys, colar_core\n"
        "for m in pkgutil.walk_packages(colar_core.__path__, 'colar_core.'):\n"
        "    __import__(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('prefect', 'mlflow'))\n"
        "print(len([n for n in sys.modules if n.startswith('colar_core')]), bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert int(out.stdout.split()[0]) > 20  # the walk really imported the package's modules
