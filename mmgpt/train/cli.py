"""The module the DeepSpeed launcher starts on every rank (`deepspeed --module mmgpt.train.cli ...`):
kept under its documented name, it only runs `mmgpt train` (mmgpt/cli/train.py)."""
import sys

from mmgpt.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
