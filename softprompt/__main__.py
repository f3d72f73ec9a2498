"""`python -m softprompt ...` runs the CLI (also what `torchrun -m softprompt train ...` starts)."""

import sys

from softprompt.cli import main

if __name__ == "__main__":
    sys.exit(main())
