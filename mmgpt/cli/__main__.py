"""`python -m mmgpt.cli ...` (torchrun starts it so) is the `mmgpt` command."""
import sys

from mmgpt.cli import main

sys.exit(main())
