"""The Triton kernels as a GPU would build them, on a machine without one: registers, spills, shared memory and
the kind of dot instructions, per kernel, specialisation and autotune config, for sm_90 (H100/H200) and sm_80.

  python bench/kernel_report.py [--arch 90,80] [--ops attention,lightning,based,rat] [--dtypes bf16,fp32]
                                [--jobs 2] [--record] [--json out.json]

Two steps, each in its own process:
  capture  every op runs once on small CPU tensors under TRITON_INTERPRET=1, forward and backward, in the variants
           the layers use (attention with sinks, full and windowed; lightning with decay; BASED; RAT).  Each kernel
           launch is recorded: argument types, constexpr values, and the autotune configs that survive the
           kernel's own pruning for those arguments, per target (each with its shared-memory limit, as
           `device_shared_memory_kb()` reports on that GPU) — the GPU candidate set.
  compile  each (kernel, specialisation, config) goes through triton.compile(target=GPUTarget("cuda", arch, 32));
           ptxas -v on its PTX gives registers and spills, Triton's metadata the shared memory, the PTX the dots.

Shared-memory limits per block: sm_90 227 KB, sm_80 163 KB (a config above it can never launch).  Dots: `wgmma`
(Hopper tensor cores), `mma` (Ampere-style tensor cores), `fma` (the source has tl.dot but it runs on CUDA
cores: fp32 IEEE operands), `-` (no dot).  Prints a table (`--record` appends it to bench/RESULTS.md); `--json`
keeps the rows for tests and comparisons.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
OPS = ("attention", "lightning", "based", "rat", "packed")  # packed: those ops on packed documents (varlen)
SHAPE = (1, 64, 2, 128)  # (batch, seq, heads, head dim): the head dim the 1B presets use; lengths do not specialise


# ------------------------------------------------------------------------------------------------ capture
def _arg_record(value):
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", "")}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):
        return {"float": value}
    if value is None:
        return {"none": True}
    return {"value": value if isinstance(value, (str,)) else repr(value)}


def _workloads(ops: list[str], dtypes: list[str]):
    """(name, callable) pairs: each runs one op forward and backward through the Triton backend."""
    import torch

    from hylo.kernels.ops import attention, based_linear_attention, lightning_attention, rat_attention, tnl_slopes

    def rand(*shape, dtype):
        return torch.randn(*shape, dtype=dtype).requires_grad_()

    b, t, h, d = SHAPE
    for name in dtypes:
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]
        if "attention" in ops:
            for window in (None, 16):
                def run(window=window, dt=dt, b=b, t=t, h=h, d=d):
                    q, k, v = rand(b, t, h, d, dtype=dt), rand(b, t, h, d, dtype=dt), rand(b, t, h, d, dtype=dt)
                    sink = torch.zeros(h, requires_grad=True)
                    attention(q, k, v, window=window, sink=sink, backend="triton").float().sum().backward()
                yield f"attention/{name}/{'window' if window else 'full'}", run

            def run_atomic(dt=dt, b=b, t=t, h=h, d=d):  # train.attention_dq=atomic: dQ from the dK/dV kernel
                from hylo.kernels.ops import set_backward_dq

                q, k, v = rand(b, t, h, d, dtype=dt), rand(b, t, h, d, dtype=dt), rand(b, t, h, d, dtype=dt)
                set_backward_dq("atomic")
                try:
                    attention(q, k, v, backend="triton").float().sum().backward()
                finally:
                    set_backward_dq("deterministic")
            yield f"attention/{name}/atomic-dq", run_atomic

        if "attention" in ops and "packed" in ops:
            def run_packed(dt=dt, t=t, h=h, d=d):  # packed documents: the varlen specialisations
                q, k, v = rand(1, t, h, d, dtype=dt), rand(1, t, h, d, dtype=dt), rand(1, t, h, d, dtype=dt)
                docs = torch.tensor([0, 3, t // 2 + 1, t], dtype=torch.int32)
                sink = torch.zeros(h, requires_grad=True)
                attention(q, k, v, sink=sink, backend="triton", cu_seqlens=docs).float().sum().backward()
            yield f"attention/{name}/packed", run_packed
        if "lightning" in ops:
            def run(dt=dt, b=b, t=t, h=h, d=d):
                q, k, v = rand(b, t, h, d, dtype=dt), rand(b, t, h, d, dtype=dt), rand(b, t, h, d, dtype=dt)
                lightning_attention(q, k, v, tnl_slopes(h, 0, 2), backend="triton").float().sum().backward()
            yield f"lightning/{name}", run

        if "lightning" in ops and "packed" in ops:
            def run_packed(dt=dt, t=t, h=h, d=d):  # packed documents: the varlen specialisations
                q, k, v = rand(1, t, h, d, dtype=dt), rand(1, t, h, d, dtype=dt), rand(1, t, h, d, dtype=dt)
                docs = torch.tensor([0, 3, t // 2 + 1, t], dtype=torch.int32)
                lightning_attention(q, k, v, tnl_slopes(h, 0, 2), backend="triton",
                                    cu_seqlens=docs).float().sum().backward()
            yield f"lightning/{name}/packed", run_packed
        if "based" in ops:
            def run(dt=dt, b=b, t=t, h=h, d=d):
                q, k, v = rand(b, t, h, 16, dtype=dt), rand(b, t, h, 16, dtype=dt), rand(b, t, h, d, dtype=dt)
                based_linear_attention(q, k, v, backend="triton").float().sum().backward()
            yield f"based/{name}", run

        if "based" in ops and "packed" in ops:
            def run_packed(dt=dt, t=t, h=h, d=d):  # packed documents: the varlen specialisations
                q, k, v = rand(1, t, h, 16, dtype=dt), rand(1, t, h, 16, dtype=dt), rand(1, t, h, d, dtype=dt)
                docs = torch.tensor([0, 3, t // 2 + 1, t], dtype=torch.int32)
                based_linear_attention(q, k, v, backend="triton", cu_seqlens=docs).float().sum().backward()
            yield f"based/{name}/packed", run_packed
        if "rat" in ops:
            def run(dt=dt, b=b, t=t, h=h, d=d):
                q, k, v = rand(b, t, h, d, dtype=dt), rand(b, t, h, d, dtype=dt), rand(b, t, h, d, dtype=dt)
                gate = torch.sigmoid(torch.randn(b, t, h, d)).requires_grad_()  # fp32, as the layer passes it
                rat_attention(q, k, v, gate, 16, rope_theta=1e4, backend="triton").float().sum().backward()
            yield f"rat/{name}", run


def capture(ops: list[str], dtypes: list[str], archs: list[int]) -> list[dict]:
    """Run the workloads under the interpreter; return one record per distinct kernel launch."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "capture runs under TRITON_INTERPRET=1"
    import hylo.kernels.triton_support as support

    tuned: dict[str, tuple[list, object]] = {}  # kernel name -> (configs, prune function)
    original_autotune = support.autotune

    def recording_autotune(configs, key, **kwargs):
        def wrap(fn):
            prune = (kwargs.get("prune_configs_by") or {}).get("early_config_prune")
            tuned[f"{fn.fn.__module__}.{fn.fn.__name__}"] = (configs, prune)
            return original_autotune(configs, key, **kwargs)(fn)
        return wrap

    support.autotune = recording_autotune  # before the kernel modules are imported
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    workload = {"name": ""}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        import inspect

        fn = self.fn
        kernel = f"{fn.__module__}.{fn.__name__}"
        names = list(inspect.signature(fn).parameters)
        values = dict(zip(names, args, strict=False))
        values.update({k: v for k, v in kwargs.items() if k in names})
        record = {"kernel": kernel, "args": {k: _arg_record(v) for k, v in values.items()},
                  "options": {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs},
                  "workload": workload["name"]}
        if kernel in tuned:
            configs, prune = tuned[kernel]
            record["configs_by_arch"] = {}
            for arch in archs:  # each target prunes with its own shared-memory limit, as on that GPU
                os.environ["HYLO_SHARED_MEMORY_KB"] = str(SMEM_LIMIT[arch] / 1024)
                kept = prune(configs, values) if prune else configs
                record["configs_by_arch"][str(arch)] = [
                    {"kwargs": c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in kept]
            os.environ.pop("HYLO_SHARED_MEMORY_KB")
            for c in configs:  # the config's own values are not part of the specialisation
                for k in c.kwargs:
                    record["args"].pop(k, None)
        identity = json.dumps([kernel, record["args"]], sort_keys=True)
        launches.setdefault(identity, record)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    for name, work in _workloads(ops, dtypes):
        workload["name"] = name
        work()
    return list(launches.values())


# ------------------------------------------------------------------------------------------------ compile
TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "int32": "i32",
                "int64": "i64", "uint8": "u8", "bool": "i1"}


def _jit_function(kernel: str):
    import importlib

    module, name = kernel.rsplit(".", 1)
    fn = getattr(importlib.import_module(module), name)
    while not hasattr(fn, "params"):  # Autotuner -> JITFunction
        fn = fn.fn
    return fn


def _ptxas(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas Triton itself uses for this arch

    ptxas = get_ptxas(arch).path
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([str(ptxas), "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, timeout=600)
    finally:
        os.unlink(f.name)
    text = out.stdout + out.stderr
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores", text)
    return {"registers": int(regs[-1]) if regs else None, "spill_bytes": int(spills[-1]) if spills else 0,
            "ptxas_error": None if out.returncode == 0 else
            next((line for line in text.splitlines() if "error" in line), text.strip())[:300]}


def compile_one(job: dict) -> dict:
    """One (kernel, specialisation, config, arch): compile for the GPU and read what it costs."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(job["kernel"])
    values = dict(job["args"])
    values.update({k: {"value": v} for k, v in job["config"].get("kwargs", {}).items()})
    signature, constexprs = {}, {}
    for param in fn.params:
        rec = values.get(param.name)
        if rec is None:  # a default argument the launch did not pass
            continue
        if param.is_constexpr or "none" in rec or "value" in rec:
            signature[param.name] = "constexpr"
            constexprs[param.name] = None if "none" in rec else next(iter(rec.values()))
        elif "tensor" in rec:
            signature[param.name] = "*" + TRITON_TYPES[rec["tensor"]]
        elif "bool" in rec:
            signature[param.name] = "i1"
        elif "int" in rec:
            signature[param.name] = "i32" if abs(rec["int"]) < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    options = {"num_warps": job["config"].get("num_warps", 4), "num_stages": job["config"].get("num_stages", 3)}
    row = {k: job[k] for k in ("kernel", "workload", "arch")}
    row.update(config=job["config"], dtypes=sorted({r["tensor"] for r in job["args"].values() if "tensor" in r}))
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", job["arch"], 32),
                                  options=options)
    except Exception as err:  # noqa: BLE001 - reported as a row, the report goes on
        row.update(error=str(err).strip().splitlines()[-1][:200] if str(err).strip() else repr(err))
        return row
    ptx, ttir = compiled.asm["ptx"], compiled.asm.get("ttir", "")
    if os.environ.get("HYLO_PTX_DIR"):  # keep the PTX to read (bench/kernel_report.py --ptx-dir)
        name = f"{job['kernel'].rsplit('.', 1)[1]}_sm{job['arch']}_{_config_text(job['config'])}".replace(" ", "_")
        Path(os.environ["HYLO_PTX_DIR"], name.replace("=", "") + ".ptx").write_text(ptx)
    shared = compiled.metadata.shared
    dots = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "fma" if "tt.dot" in ttir else "-"
    row.update(shared=shared, fits=shared <= SMEM_LIMIT[job["arch"]], dots=dots, **_ptxas(ptx, job["arch"]))
    return row


def jobs_for(launches: list[dict], archs: list[int], max_configs: int = 0) -> list[dict]:
    jobs = []
    for launch in launches:
        for arch in archs:
            configs = launch.get("configs_by_arch", {}).get(str(arch)) or [launch.get("options") or {}]
            configs = configs[-max_configs:] if max_configs else configs  # the largest tiles come last
            for config in configs:
                jobs.append({"kernel": launch["kernel"], "workload": launch["workload"], "args": launch["args"],
                             "config": config, "arch": arch})
    return jobs


# ------------------------------------------------------------------------------------------------ report
def _config_text(config: dict) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in config.get("kwargs", {}).items())
    return f"{blocks} w{config.get('num_warps', 4)} s{config.get('num_stages', 3)}".strip()


def table(rows: list[dict]) -> str:
    lines = ["| kernel | workload | arch | config | regs | spills (B) | smem (KB) | fits | dots |",
             "|---|---|---|---|---:|---:|---:|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["workload"], r["arch"], _config_text(r["config"]))):
        kernel = r["kernel"].replace("hylo.kernels.", "").replace(".triton.", ".")
        if "error" in r:
            lines.append(f"| {kernel} | {r['workload']} | sm_{r['arch']} | {_config_text(r['config'])} | "
                         f"compile error: {r['error']} | | | | |")
            continue
        lines.append(f"| {kernel} | {r['workload']} | sm_{r['arch']} | {_config_text(r['config'])} | "
                     f"{r['registers']} | {r['spill_bytes']} | {r['shared'] / 1024:.0f} | "
                     f"{'yes' if r['fits'] else '**no**'} | {r['dots']} |")
    return "\n".join(lines)


def problems(rows: list[dict]) -> list[str]:
    """What a GPU would reject or run slowly: configs over the shared-memory limit, compile failures, spills, and
    16-bit kernels whose dots run on CUDA cores."""
    found = []
    for r in rows:
        where = f"{r['kernel']} [{r['workload']}, sm_{r['arch']}, {_config_text(r['config'])}]"
        if "error" in r:
            found.append(f"{where}: does not compile ({r['error']})")
            continue
        if not r["fits"]:
            found.append(f"{where}: {r['shared'] / 1024:.0f} KB shared memory > {SMEM_LIMIT[r['arch']] // 1024} KB")
        if r["spill_bytes"]:
            found.append(f"{where}: spills {r['spill_bytes']} bytes")
        if r["dots"] == "fma" and set(r["dtypes"]) & {"bfloat16", "float16"}:
            found.append(f"{where}: 16-bit inputs, dots on CUDA cores (fma)")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90,80")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--max-configs", type=int, default=0, help="compile only the last N configs of each "
                                                                   "kernel (the largest tiles); 0 = all")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--ptx-dir", default="", help="also write each compiled kernel's PTX into this folder")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ops, dtypes = args.ops.split(","), args.dtypes.split(",")

    if args.capture:
        print("CAPTURE " + json.dumps(capture(ops, dtypes, [int(a) for a in args.arch.split(",")])))
        return 0
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, __file__, "--capture", "--ops", args.ops, "--dtypes", args.dtypes,
                          "--arch", args.arch],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("CAPTURE ")]
    if out.returncode or not lines:
        print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
        return 1
    launches = json.loads(lines[-1][len("CAPTURE "):])
    if args.ptx_dir:
        Path(args.ptx_dir).mkdir(parents=True, exist_ok=True)
        os.environ["HYLO_PTX_DIR"] = str(Path(args.ptx_dir).resolve())
    jobs = jobs_for(launches, [int(a) for a in args.arch.split(",")], args.max_configs)
    print(f"[kernel_report] {len(launches)} kernel specialisations, {len(jobs)} compiles", file=sys.stderr)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(compile_one, jobs))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    from bench.record import machine, publish

    found = problems(rows)
    text = "\n".join([f"### kernel_report: ops {args.ops}, dtypes {args.dtypes}, sm {args.arch}",
                      f"{machine()} · triton.compile for the GPU target, ptxas -v (no GPU)", "", table(rows), "",
                      f"{len(found)} problem(s)" + (":" if found else "."), *[f"- {p}" for p in found], ""])
    publish(text, record=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
