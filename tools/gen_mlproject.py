"""Write MLproject from the config dataclasses (scaling_lab.projectspec); run after changing a field or a mode.

    PYTHONPATH=src python tools/gen_mlproject.py          # rewrite MLproject
    PYTHONPATH=src python tools/gen_mlproject.py --check  # exit 1 when MLproject is out of date
"""

import sys
from pathlib import Path

from scaling_lab.projectspec import mlproject_text

if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "MLproject"
    if "--check" in sys.argv[1:]:
        sys.exit(0 if path.read_text() == mlproject_text() else 1)
    path.write_text(mlproject_text())
    print(f"wrote {path}")
