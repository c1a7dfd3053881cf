"""Loading a >1 GB checkpoint stays inside the planned host memory (measured in a fresh subprocess).

The checkpoint has the real layout (trunk shard, one file per expert, index, config) with random
bytes for codes: a memory test needs the right shapes, not a trained model. On CPU both the device
slots and the host buffers live in RAM, so the bound is: process baseline + all expert buffers +
the mapped trunk shard + fp32 copies of the dense trunk + one expert shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import MixtralConfig

from colab_helpers.planning.planner import MB, Budget, Margins, ModelSizes, plan_for_checkpoint
from colab_helpers.weights.checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
    QuantConfig,
    expert_prefix,
    shard_name,
)
from colab_helpers.weights.model_spec import ModelSpec

REPO = Path(__file__).resolve().parents[1]
K = 2  # experts per layer in "device" slots
TOLERANCE = 64 * MB  # allocator and interpreter noise on top of the bound

# hidden 1024 / intermediate 3584 meets the grouping rules: out % g == 0 and (out*in/g) % gs == 0
CONFIG = dict(
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=28,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    vocab_size=32000,
    max_position_embeddings=4096,
)


def _random(dtype: torch.dtype, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    return torch.rand(shape, generator=gen).to(dtype)


def write_checkpoint(root: Path) -> int:
    """A checkpoint in the offloading layout with random contents; returns its size in bytes."""
    config, quant, gen = MixtralConfig(**CONFIG), QuantConfig(), torch.Generator().manual_seed(0)
    n_files = 1 + config.num_hidden_layers * config.num_local_experts
    trunk = {k: _random(d, s, gen) for k, (d, s) in dict(ModelSpec.of(config, quant).trunk_tensors).items()}
    save_file(trunk, root / shard_name(1, n_files))
    weight_map = dict.fromkeys(trunk, shard_name(1, n_files))
    expert = {k: _random(d, s, gen) for k, (d, s) in dict(ModelSpec.of(config, quant).expert_tensors).items()}
    for layer in range(config.num_hidden_layers):
        for e in range(config.num_local_experts):
            name = shard_name(2 + layer * config.num_local_experts + e, n_files)
            save_file(expert, root / name)  # same bytes in every file: distinct pages all the same
            weight_map |= {expert_prefix(layer, e) + k: name for k in expert}
    (root / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / CONFIG_FILE).write_text(json.dumps({"model_type": "mixtral", **CONFIG}))
    return sum(p.stat().st_size for p in root.iterdir())


CHILD = r"""
import json, sys, threading, time
import psutil
from colab_helpers.model import load_model
from colab_helpers.planning.planner import plan_for_checkpoint

path, k = sys.argv[1], int(sys.argv[2])
# the plan as a loader makes it: this process's RSS measured now, not an assumed import cost;
# loading only (context 1, no forward pass, so no dense fp32 copies yet)
plan = plan_for_checkpoint(path, device="cpu", context=1, experts_on_device=k, dense_on_cpu=False)
peak = {"RssAnon": 0, "RssFile": 0}
done = threading.Event()

def sample():
    while not done.is_set():
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]) * 1024)
        time.sleep(0.005)

def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

baseline = psutil.Process().memory_info().rss
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
model = load_model(path, device="cpu", experts_on_device=k, progress=False)
seconds = time.perf_counter() - start
done.set()
thread.join()
cache = model.expert_cache
print(json.dumps({
    "baseline": baseline,
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would report the forking pytest
    # process's RSS (2 GB late in a full run); VmHWM belongs to this process's own address space
    "peak": hwm(),
    "peak_anon": peak["RssAnon"],
    "peak_file": peak["RssFile"],
    "buffers": cache.device_bytes + cache.host_bytes,
    "seconds": seconds,
    "plan_ram_peak": plan.ram_peak,
    "plan_process_rss": plan.process_rss,
    "plan_report": plan.report(),
}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("ckpt-1gb")
    return root, write_checkpoint(root)


def _load_in_subprocess(path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(K)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_load_peak_rss_within_plan(checkpoint):
    """Holds with the CPU and the CUDA build of torch (whose imports alone take ~0.25 GB more RSS)."""
    path, size = checkpoint
    assert size >= 1_000_000_000
    budget = Budget.given(None, 1000)
    plan = plan_for_checkpoint(path, device="cpu", context=1, experts_on_device=K, budget=budget, dense_on_cpu=False)
    s: ModelSizes = plan.sizes
    m = _load_in_subprocess(path)
    numbers = {k: v for k, v in m.items() if k != "plan_report"}
    print(f"\ncheckpoint {size / 1e9:.2f} GB; measured {json.dumps(numbers)}")
    print(m["plan_report"])

    assert m["buffers"] == (s.total_experts + plan.spare_slots) * s.slot_bytes  # the plan's exact buffer bytes
    bound = m["baseline"] + m["buffers"] + s.trunk_bytes + 2 * s.dense_trunk_bytes + s.expert_bytes + TOLERANCE
    assert m["peak"] <= bound, (
        f"peak RSS {m['peak'] / 1e9:.3f} GB > baseline {m['baseline'] / 1e9:.3f} + buffers {m['buffers'] / 1e9:.3f} "
        f"+ trunk shard {s.trunk_bytes / 1e9:.3f} + fp32 dense trunk {2 * s.dense_trunk_bytes / 1e9:.3f} "
        f"+ one expert shard {s.expert_bytes / 1e9:.3f} GB (+{TOLERANCE / 1e6:.0f} MB)"
    )
    # the child's own plan counted its measured RSS, whatever torch build imported
    assert abs(m["plan_process_rss"] - m["baseline"]) < 32 * MB
    assert m["peak"] <= m["plan_ram_peak"], (
        f"peak RSS {m['peak'] / 1e9:.3f} GB above the plan's {m['plan_ram_peak'] / 1e9:.3f}"
    )
    # the what-if margin (plans made for another machine) covers this build's import cost
    assert m["baseline"] <= Margins().python_rss
    assert m["peak"] <= plan.ram_peak  # so the what-if plan holds here too
