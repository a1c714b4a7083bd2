"""Launch GPT-NeoX-style training: ``python deepy.py train.py CONFIG.yml [CONFIG.yml ...]``.

See docs/launching.md for single-CPU, multi-GPU, hostfile and slurm launches.
"""
import sys

from megatron.errors import cli_main
from megatron.launcher import main

if __name__ == "__main__":
    sys.exit(cli_main(main)())
