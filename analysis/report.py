"""Print the verdict and the main exponents of an existing report folder (its fits.json).

    python analysis/report.py reports/analyze-20260101-120000
"""

import json
import sys
from pathlib import Path

from scaling_lab import laws


def show(folder: str) -> int:
    path = Path(folder) / "fits.json" if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        print(f"error: parameter 'folder': got {folder!r}; allowed: a report folder or fits.json", file=sys.stderr)
        return 2
    fits = json.loads(path.read_text())
    for conv, verdicts in fits["verdict"].items():
        for name, v in verdicts.items():
            if v.get("a") is not None:
                print(laws.verdict_sentence(f"{conv} / {name}", v))
    prov = fits["provenance"]
    print("provenance:", {k: v for k, v in prov.items() if k != "run_ids"},
          f"({len(prov.get('run_ids', []))} run ids)" if "run_ids" in prov else "")
    return 0


if __name__ == "__main__":
    sys.exit(show(sys.argv[1] if len(sys.argv) > 1 else ""))
