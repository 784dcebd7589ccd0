"""MLflow entry point `doctor`: check device, memory, stores, tokenizer and data for a mode."""

import sys

from scaling_lab.cli import main_doctor

if __name__ == "__main__":
    sys.exit(main_doctor(sys.argv[1:]))
