"""Hugging Face in and out on the CPU: what exporting and importing a 1B model costs, and what transformers'
`generate` costs over hylo's own decoding through the same caches.

  python bench/bench_hf.py [--record] [--presets hybrid_1b,dense_1b] [--skip-1b]

  export 1B     a hylo model of the preset (random weights, the bundled tokenizer's vocabulary) -> the folder
                `export --format hf` writes (save_hf: bf16, 5 GB shards): seconds and the process's peak resident
                memory (the fp32 model included); then AutoModelForCausalLM.from_pretrained of that folder
  import 1B     a Llama folder of dense_1b's shape (random, saved by transformers) -> `hylo import` with the
                preset's pattern: seconds and peak memory
  generate      hybrid_tiny (random): tokens/s of HyloForCausalLM.generate (greedy, through HyloCache) vs
                HybridLM.generate, the same model and prompt, best of 3; the ratio is the cache wrapper's cost

Each stage runs in its own process, so its peak memory is its own.  Prints a table (`--record` appends it to
bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, publish  # noqa: E402

PRELUDE = """
import json, resource, sys, time
import torch
torch.manual_seed(0)
def done(seconds):
    print(json.dumps(dict(seconds=seconds, peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)))
"""

EXPORT = PRELUDE + """
from pathlib import Path
from hylo.models.lm import HybridLM
from hylo.trainer.checkpointing.export import save_hf
from hylo.trainer.config import load_config
cfg = load_config("{config}", ["model.vocab_size=4096"])
model = HybridLM(cfg.model)
start = time.perf_counter()
save_hf(model, cfg.model, cfg.train.seq_len, "", Path("{out}"), "bf16", "5GB")
done(time.perf_counter() - start)
"""

LOAD = PRELUDE + """
from transformers import AutoModelForCausalLM
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained("{out}", trust_remote_code=True, dtype=torch.bfloat16)
seconds = time.perf_counter() - start
with torch.no_grad():
    model(torch.zeros(1, 8, dtype=torch.long))  # every weight read once: memory-mapped shards count when touched
done(seconds)
"""

LLAMA = PRELUDE + """
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=32768, hidden_size=2048, intermediate_size={ffn}, num_hidden_layers=24,
                     num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained("{out}")
done(0.0)
"""

IMPORT = PRELUDE + """
from hylo.trainer.cli import main
start = time.perf_counter()
assert main(["import", "--hf", "{hf}", "--out", "{out}", "--config", "{config}", "--dtype", "bf16"]) == 0
done(time.perf_counter() - start)
"""

GENERATE = PRELUDE + """
from hylo.models.lm import HybridLM
from hylo.trainer.checkpointing.hf_model import HyloConfig, HyloForCausalLM
from hylo.trainer.config import load_config
from omegaconf import OmegaConf
torch.set_num_threads(1)
cfg = load_config("configs/hybrid_tiny.yaml", ["model.vocab_size=4096"])
hf = HyloForCausalLM(HyloConfig(hylo_model=OmegaConf.to_container(OmegaConf.structured(cfg.model)))).eval()
hf.generation_config.eos_token_id = None
model = hf.model
prompt = torch.randint(0, 4096, (1, 64))
new = {new}
def best(fn):
    times = []
    for _ in range(3):
        start = time.perf_counter(); out = fn(); times.append(time.perf_counter() - start)
    return min(times), out
with torch.no_grad():
    ours, a = best(lambda: model.generate(prompt, new))
    theirs, b = best(lambda: hf.generate(prompt, max_new_tokens=new, do_sample=False))
assert torch.equal(a, b)
print(json.dumps({{"hylo": new / ours, "hf": new / theirs}}))
"""


def run(code: str) -> dict:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                         timeout=3600)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--presets", default="hybrid_1b,dense_1b")
    parser.add_argument("--skip-1b", action="store_true", help="only the generation row")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    rows = [f"### bench_hf · {machine()}", "", "| what | model | seconds | peak GiB | note |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if not args.skip_1b:
            for preset in args.presets.split(","):
                out = work / preset
                config = f"configs/{preset}.yaml"
                exported = run(EXPORT.format(config=config, out=out))
                rows.append(f"| export --format hf | {preset} | {exported['seconds']:.1f} | "
                            f"{exported['peak_gib']:.1f} | from an fp32 model in memory; bf16, 5 GB shards |")
                loaded = run(LOAD.format(out=out))
                rows.append(f"| from_pretrained | {preset} | {loaded['seconds']:.1f} | {loaded['peak_gib']:.1f} | "
                            "AutoModelForCausalLM, trust_remote_code; peak after one forward |")
                print("\n".join(rows[-2:]), flush=True)
            llama = work / "llama"
            run(LLAMA.format(out=llama, ffn=5504))
            for preset in args.presets.split(","):
                imported = run(IMPORT.format(hf=llama, out=work / f"{preset}.safetensors", config=f"configs/"
                                             f"{preset}.yaml"))
                rows.append(f"| hylo import | Llama 1.3B -> {preset} | {imported['seconds']:.1f} | "
                            f"{imported['peak_gib']:.1f} | dense_1b's shape, the preset's pattern |")
                print(rows[-1], flush=True)
        speed = run(GENERATE.format(new=args.new_tokens))
        rows.append(f"| generate, hybrid_tiny | HF / hylo | {speed['hf']:.0f} / {speed['hylo']:.0f} tok/s | - | "
                    f"ratio {speed['hf'] / speed['hylo']:.2f} (greedy, {args.new_tokens} new tokens after 64, "
                    "1 thread, best of 3; the same tokens) |")
    publish("\n".join(rows) + "\n", record=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
