"""MLflow entry point `ablation`: Kaplan's protocol to Chinchilla's, one isoFLOP search per step (docs/ablation.md)."""

import sys

from scaling_lab.cli import main_ablation

if __name__ == "__main__":
    sys.exit(main_ablation(sys.argv[1:]))
