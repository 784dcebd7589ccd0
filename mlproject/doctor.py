"""MLflow entry point `doctor`: check device, memory, stores, tokenizer and data for a mode."""

import sys

from scaling_lab.doctor import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
