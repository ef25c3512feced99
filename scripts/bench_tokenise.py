"""Time `build_data` on a data config twice (first run tokenises, second loads the cache).

    .venv/bin/python scripts/bench_tokenise.py /tmp/sni-cache data=sni_train eval.max_instances_per_task=null

Each run is a fresh process, so the second one measures a real cache hit.
"""

import subprocess
import sys

RUN = """
import sys, time
from transformers import AutoTokenizer
from mode.run.config import compose
from mode.data.dataset import build_data
from mode.models import resolve_model_path
cfg = compose("train", sys.argv[2:])
tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model))
start = time.perf_counter()
data = build_data(cfg.data, cfg.eval, tok, cache_dir=sys.argv[1])
print(f"{len(data.tasks)} tasks, {len(data.train)} training + {len(data.eval)} evaluation instances: "
      f"{time.perf_counter() - start:.1f} s", flush=True)
"""

if __name__ == "__main__":
    for label in ("first run ", "second run"):
        out = subprocess.run([sys.executable, "-c", RUN, *sys.argv[1:]], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-2000:])
        print(label, out.stdout.strip())
