"""``python -m colab_helpers plan``: the planner's command line, one GPU or several (``--gpus``).

Apart from ``planner.py`` because it joins the one-GPU planner and ``multigpu.py`` (which builds on the
planner): in the planner it made an import circle.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch
from transformers import MixtralConfig

from ..runtime.placement import split_refusal
from ..usage import ArgumentParser, UsageError, check_experts_on_device, device_name, positive_float, positive_int
from ..weights.checkpoint import QuantConfig
from ..weights.families import MoEArchitecture
from ..weights.model_spec import ModelSpec
from ..weights.quant import DEFAULT_EXPERT_SPECS
from .multigpu import plan_gpus, single_gpu_upgrades
from .planner import (
    DEFAULT_CONTEXT,
    GB,
    Budget,
    _device,
    measure_budget,
    model_for_cli,
    plan_memory,
    stock_config,
)

PLAN_DESCRIPTION = (
    "Memory plan: free VRAM and host RAM → experts per layer on the GPU, KV budget, or a refusal with reasons."
)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m colab_helpers plan", description=PLAN_DESCRIPTION)
    p.add_argument(
        "--vram-gb",
        type=positive_float,
        default=None,
        help="free VRAM in GB (10^9 B), as mem_get_info reports (default: measured on this machine's GPU)",
    )
    p.add_argument(
        "--ram-gb",
        type=positive_float,
        default=None,
        help="available host RAM in GB (psutil's 'available'; default: measured here)",
    )
    p.add_argument(
        "--context",
        type=positive_int,
        default=DEFAULT_CONTEXT,
        help=f"tokens of context, prompt + answer (default {DEFAULT_CONTEXT})",
    )
    p.add_argument(
        "--expert-bits",
        type=int,
        default=2,
        choices=sorted(DEFAULT_EXPERT_SPECS),
        help="expert bit width; 2 = the public checkpoint (default 2)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="a checkpoint folder (config and bit widths read from it), a folder or config.json of any supported "
        "MoE family, or a hub repo id (shipped flagship configs offline, else config.json from the hub; "
        "default: Mixtral-8x7B)",
    )
    p.add_argument(
        "--device", type=device_name, default=None, help="cuda or cpu (default: cuda with --vram-gb or a GPU present)"
    )
    p.add_argument(
        "--experts-on-device",
        type=positive_int,
        default=None,
        help="check this k instead of choosing one (default: the plan chooses)",
    )
    p.add_argument(
        "--gpus",
        type=positive_int,
        default=1,
        help="GPUs of --vram-gb each (Kaggle: 2); layers are split across them (default 1)",
    )
    p.add_argument("--json", action="store_true", help="print only the plan as a JSON object (report to stderr)")
    return p


def _cli_device(args: argparse.Namespace) -> torch.device:
    """The device planned for; ``UsageError`` when the numbers needed for a GPU are neither given nor measurable."""
    if args.device in (None, "auto"):
        device = torch.device("cuda") if args.vram_gb is not None else _device("auto")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        missing = [flag for flag, value in (("--vram-gb", args.vram_gb), ("--ram-gb", args.ram_gb)) if value is None]
        if missing:
            raise UsageError(
                f"this machine has no GPU to measure, so give {' and '.join(missing)} for the one you plan for "
                "(a free Colab T4: --vram-gb 15 --ram-gb 12.7)"
            )
    return device


def _cli_budget(args: argparse.Namespace, device: torch.device) -> Budget:
    if args.vram_gb is not None and args.ram_gb is not None:
        return Budget.given(args.vram_gb, args.ram_gb)
    here = measure_budget(device)
    vram = int(args.vram_gb * GB) if args.vram_gb is not None else here.vram
    ram = int(args.ram_gb * GB) if args.ram_gb is not None else here.ram
    return Budget(vram, ram, rss_now=here.rss_now if args.ram_gb is None else 0, measured=True)


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``python -m colab_helpers plan``: exit 0 when it fits, 2 when not (the report says why).

    Bad arguments raise ``usage.UsageError`` (``cli.main`` prints it as one line). With ``--json``
    stdout holds only the JSON object, so it pipes into ``python -m json.tool``; the report goes to stderr.
    """
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    device = _cli_device(args)
    if args.model:
        config, quant, read = model_for_cli(args.model, args.expert_bits)
        if read:
            print(read, file=sys.stderr)
    else:
        config, quant = stock_config(), QuantConfig.for_bits(4, args.expert_bits)
    experts = ModelSpec.of(config, quant).num_experts
    check_experts_on_device(args.experts_on_device, experts, args.model or "Mixtral-8x7B")
    if args.gpus > 1:
        return _cli_multi_gpu(args, config, quant)
    plan = plan_memory(config, quant, _cli_budget(args, device), device, args.context, args.experts_on_device)
    if plan.fits and args.experts_on_device is None:
        plan = single_gpu_upgrades(plan, config, quant)
    print(plan.report(), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(plan.to_dict()))
    return 0 if plan.fits else 2


def _cli_multi_gpu(args: argparse.Namespace, config: MixtralConfig | MoEArchitecture, quant: QuantConfig) -> int:
    """``plan --gpus N``: whole layers per GPU (see ``multigpu.py``); each GPU measured here when present."""
    if args.experts_on_device is not None:
        raise UsageError("--experts-on-device is chosen per GPU with --gpus; leave it out")
    if why := split_refusal(ModelSpec.of(config).arch):
        raise UsageError(f"--gpus {args.gpus}: {why}")
    if args.vram_gb is not None:
        vram = [int(args.vram_gb * GB)] * args.gpus
    elif torch.cuda.device_count() >= args.gpus:
        vram = [torch.cuda.mem_get_info(i)[0] for i in range(args.gpus)]
    else:
        raise UsageError(f"this machine has fewer than {args.gpus} GPUs to measure: give --vram-gb (per GPU)")
    ram = int(args.ram_gb * GB) if args.ram_gb is not None else measure_budget("cpu").ram
    plan = plan_gpus(config, quant, vram, ram, args.context)
    print(plan.report(), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(plan.to_dict()))
    return 0 if plan.fits else 2
