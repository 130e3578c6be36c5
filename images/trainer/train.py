"""Entrypoint of the Kiln trainer image: the program is the kiln_trainer package (README "Trainer").

Single process: ``python train.py --dataset-uri ... --output-uri ...``; multi-GPU / multi-node:
``torchrun --nnodes N --nproc-per-node P ... train.py ...`` (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK).
"""

import sys

from kiln_trainer.loop import main

if __name__ == "__main__":
    sys.exit(main())
