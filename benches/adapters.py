"""Memory and time of merging LoRA adapters: ``ferromerge.merge_adapters`` against PEFT's ``add_weighted_adapter``
on CPU, over an 8B-shaped module set (Llama-3-8B: 32 layers × q,k,v,o,gate,up,down; q,o 4096×4096, k,v 1024×4096,
gate,up 14336×4096, down 4096×14336), two bfloat16 adapters of rank 64.

    python benches/adapters.py [--dir DIR] [--layers 32] [--peft-layers 1] [--combinations svd ties_svd]
                               [--density 0.5] [--threads 2] [--skip-peft] [--json OUT]

Every run is a fresh child process; its peak RSS is the child's own ``VmHWM`` (read by the child as it ends:
``ru_maxrss`` would carry the parent's high-water mark over fork + exec), its time the wall clock of the whole process (start-up, reading, merging, writing). The load average (1 min) is recorded before and
after each run: the machine may be shared.

ferromerge merges ``--layers`` layers. PEFT needs the base model in memory (its adapters are injected into the
modules) and computes a full SVD of each module's ΔW, so it runs on the first ``--peft-layers`` layers only (a
Llama with that many layers at 8B's widths, bfloat16, weights left uninitialised: ``add_weighted_adapter`` reads
only their shapes and dtype), with ``svd_full_matrices=False`` (its default True also builds the 14336×14336 V);
ferromerge runs on the same subset too, so the two compare like for like. PEFT's time counts loading the
adapters, ``add_weighted_adapter`` and saving the merged adapter; it gets ``--threads`` threads
(``torch.set_num_threads``, OMP/MKL env, ``OMP_WAIT_POLICY=PASSIVE``). ferromerge's engine gets ``--threads``
(``threads=``) and NumPy's BLAS one thread (its calls are small; on a busy machine OpenBLAS's threads mostly wait on
each other: 8× slower at 2 threads under load here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from ferromerge import _engine

PEFT_PY = Path(os.environ.get("FERROMERGE_PEFT_PYTHON", Path.home() / ".cache/ferromerge/mergekit-venv/bin/python"))
HIDDEN, KV, INTER, RANK = 4096, 1024, 14336, 64
MODULES = {  # module -> ΔW shape (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}
ADAPTERS = [("a", 0.7, 1), ("b", 0.5, 2)]  # name, weight, seed


def write_adapter(path: Path, layers: int, seed: int) -> None:
    """A rank-64 bf16 adapter; layer i's factors depend on (seed, i) only, so a subset equals the full one's start."""
    if (path / "adapter_config.json").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(layers):
        rng = np.random.default_rng([seed, i])
        for m, (o, n) in MODULES.items():
            key = f"base_model.model.model.layers.{i}.{m}"
            a = (rng.standard_normal((RANK, n), np.float32) / np.sqrt(n)).astype(np.float32)
            b = (rng.standard_normal((o, RANK), np.float32) * 0.01).astype(np.float32)
            tensors[f"{key}.lora_A.weight"] = (_engine.encode(a, "BF16"), "BF16")
            tensors[f"{key}.lora_B.weight"] = (_engine.encode(b, "BF16"), "BF16")
    _engine.save_file(str(path / "adapter_model.safetensors"), tensors, {"format": "pt"})
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "task_type": "CAUSAL_LM", "use_rslora": False,
              "target_modules": sorted({m.split(".")[1] for m in MODULES}), "base_model_name_or_path": "llama-8b-shape",
              "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {}}
    (path / "adapter_config.json").write_text(json.dumps(config))


OURS = textwrap.dedent(
    """
    import sys, ferromerge
    out, comb, density, threads, *dirs = sys.argv[1:]
    pairs = [(d, float(w)) for d, w in (x.rsplit(":", 1) for x in dirs)]
    ferromerge.merge_adapters(out, pairs, combination=comb, density=float(density), threads=int(threads),
                              overwrite=True)
    print("VmHWM", [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0], file=sys.stderr)
    """
)

PEFT = textwrap.dedent(
    """
    import sys, time, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import PeftModel
    out, comb, density, threads, layers, *dirs = sys.argv[1:]
    torch.set_num_threads(int(threads))
    cfg = LlamaConfig(vocab_size=128, hidden_size=4096, intermediate_size=14336, num_hidden_layers=int(layers),
                      num_attention_heads=32, num_key_value_heads=8)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    pairs = [(d, float(w)) for d, w in (x.rsplit(":", 1) for x in dirs)]
    t0 = time.perf_counter()
    model = PeftModel.from_pretrained(model, pairs[0][0], adapter_name="a0")
    for i, (d, _) in enumerate(pairs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
    t1 = time.perf_counter()
    model.add_weighted_adapter([f"a{i}" for i in range(len(pairs))], [w for _, w in pairs], "merged",
                               combination_type=comb, density=float(density), svd_full_matrices=False)
    t2 = time.perf_counter()
    model.save_pretrained(out, selected_adapters=["merged"])
    print(f"load {t1 - t0:.2f} merge {t2 - t1:.2f} save {time.perf_counter() - t2:.2f}", file=sys.stderr)
    print("VmHWM", [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0], file=sys.stderr)
    """
)


def run(cmd: list[str], env: dict[str, str]) -> dict:
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-3000:]}")
    # the child's own VmHWM: ru_maxrss would include the parent's high-water mark, inherited through fork + exec
    lines = stderr.strip().splitlines()
    hwm_kb = int(next(x for x in lines if x.startswith("VmHWM")).split()[1])
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_gb": round(hwm_kb * 1024 / 1e9, 3), "load_before": round(load0, 2),
            "load_after": round(os.getloadavg()[0], 2), "detail": [x for x in lines if x.startswith("load ")]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ferromerge-bench-adapters")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--peft-layers", type=int, default=1)
    p.add_argument("--combinations", nargs="+", default=["svd", "ties_svd"])
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE", CUDA_VISIBLE_DEVICES="")
    sets = {args.layers: {}, args.peft_layers: {}}
    for layers in sets:
        for name, w, seed in ADAPTERS:
            d = args.dir / f"{name}-{layers}L"
            write_adapter(d, layers, seed)
            sets[layers][name] = f"{d}:{w}"
    size = sum((args.dir / f"{n}-{args.layers}L" / "adapter_model.safetensors").stat().st_size for n, _, _ in ADAPTERS)
    results = {"machine": {"cpus": os.cpu_count(), "threads": args.threads}, "adapters_bytes": size, "runs": []}
    print(f"{len(ADAPTERS)} adapters of rank {RANK}, {args.layers} layers: {size / 1e9:.2f} GB in", flush=True)
    for comb in args.combinations:
        plan = [("ferromerge", args.layers), ("ferromerge", args.peft_layers)]
        if not args.skip_peft:
            plan.append(("peft", args.peft_layers))
        for tool, layers in plan:
            out = args.dir / f"out-{tool}-{comb}-{layers}L"
            dirs = list(sets[layers].values())
            if tool == "ferromerge":
                cmd = [sys.executable, "-c", OURS, str(out), comb, str(args.density), str(args.threads), *dirs]
                # the engine runs on `threads`; NumPy's BLAS calls here are small (Gram matrices, B·A of one module)
                # and OpenBLAS's threads only synchronise on a busy machine
                tool_env = dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
            else:
                cmd = [str(PEFT_PY), "-c", PEFT, str(out), comb, str(args.density), str(args.threads),
                       str(layers), *dirs]
                tool_env = env
            r = {"tool": tool, "combination": comb, "layers": layers, **run(cmd, tool_env)}
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
    print("\n| tool | combination | layers | wall s | CPU s | peak RSS GB | load 1-min before/after |")
    print("|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        print(f"| {r['tool']} | {r['combination']} | {r['layers']} | {r['wall_s']} | {r['cpu_s']} | "
              f"{r['peak_rss_gb']} | {r['load_before']} / {r['load_after']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
