"""Run `mode-train`, and let every process save its own trained adapter before evaluation, for the
distributed tests (the run itself saves rank 0's only).

    python tests/rank_dump.py DUMP_DIR -- <mode-train arguments>     (under torchrun: one file per RANK)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> None:
    dump_dir, rest = Path(sys.argv[1]), sys.argv[2:]
    assert rest[0] == "--", "usage: rank_dump.py DUMP_DIR -- <mode-train arguments>"
    from safetensors.torch import save_file

    import mode.train
    from mode.adapters import adapter_state_dict

    original_evaluate = mode.train.evaluate

    def evaluate(model, *args, **kwargs):
        dump_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
        save_file(state, str(dump_dir / f"rank{os.environ.get('RANK', '0')}.safetensors"))
        return original_evaluate(model, *args, **kwargs)

    mode.train.evaluate = evaluate
    sys.argv = ["mode-train", *rest[1:]]
    mode.train.main()


if __name__ == "__main__":
    main()
