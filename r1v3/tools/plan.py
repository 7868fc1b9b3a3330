"""``r1v3 plan``: will a run fit? The memory each rank needs, term by term, from a run's config and
its model built on the meta device (``r1v3 shapes``), before anything is loaded.

The model of memory (docs/planning.md gives each term's formula and source):
- parameters, gradients and AdamW states are sharded over all ranks by FSDP2 (float32 master
  weights under ``mixed_precision: bf16``, as r1v3 keeps them);
- activations per token and decoder layer are the tensors autograd saves, counted as Korthikanti
  et al. 2022 (arXiv 2205.05198, §4) count them, for SwiGLU MLPs, grouped-query attention and
  float32 norms, without the attention-score term (SDPA and flash attention keep no score matrix);
  with checkpointing, one layer input per layer plus one layer recomputed;
- the logits are materialised for the whole micro-batch (compute dtype, a float32 copy and its
  log-softmax);
- the KL reference is sharded like the policy under FSDP2 (a full copy per rank without it);
- under FSDP2 each rank reads only its shard of the checkpoint at load (else the whole of it);
- vLLM claims ``gpu_memory_utilization`` of the device while it rolls out; in sleep mode it
  frees it in training and parks its weights in host memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

GB = 1e9
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


class PlanError(ValueError):
    pass


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config(paths: list[str], overrides: list[str] = ()) -> dict:
    """The run's config as LightningCLI would merge it: the files in order, then ``--a.b value``
    overrides (values read as YAML)."""
    config: dict = {}
    for path in paths:
        if not Path(path).is_file():
            raise PlanError(f"config file {path} does not exist")
        config = deep_merge(config, yaml.safe_load(Path(path).read_text()) or {})
    it = iter(overrides)
    for key in it:
        if not key.startswith("--"):
            continue
        key, _, value = key[2:].partition("=")
        value = value if _ else next(it, "")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return config


@dataclass
class Run:
    """What the planner reads from a config."""

    stage: str
    model_path: str
    trainable: list[str]
    load_dtype: str = "float32"
    ranks: int = 1
    sharded: bool = False
    ranks_per_node: int = 1
    accelerator: str = "cpu"
    mixed_bf16: bool = False
    checkpointing: bool = False
    cpu_offload: bool = False
    optimizer: str = "adamw"
    kl_coef: float = 0.0
    micro_batch_tokens: int = 8192
    rollout: str = "hf"
    vllm: dict = field(default_factory=dict)
    attn_implementation: str = "sdpa"
    lora: dict = field(default_factory=dict)  # the stage's lora settings (groups, r, target_modules)


def adapter_params(run: Run, counts: dict) -> int:
    """Parameters of the LoRA adapters a run adds: r × (in + out) per adapted linear layer."""
    groups, r = run.lora.get("groups") or [], int(run.lora.get("r", 16))
    wanted = set(run.lora.get("target_modules") or [])
    return sum(r * width for group in groups for leaf, width in counts.get("linear_widths", {}).get(group, {}).items()
               if not wanted or leaf in wanted)


def run_of(config: dict, gpus: int | None = None) -> Run:
    trainer, model = config.get("trainer", {}), config.get("model", {})
    args = model.get("init_args", {})
    strategy = trainer.get("strategy", {})
    strategy_args = strategy.get("init_args", {}) if isinstance(strategy, dict) else {}
    sharded = isinstance(strategy, dict) and "FSDP" in str(strategy.get("class_path", ""))
    devices = trainer.get("devices", 1)
    devices = 1 if not isinstance(devices, int) else devices
    ranks = gpus or devices * int(trainer.get("num_nodes", 1))
    load = args.get("load", {}) or {}
    stage = str(model.get("class_path", "")).rsplit(".", 1)[-1]
    data = config.get("data", {}).get("init_args", {})
    if stage == "GRPOStage":
        tokens = int(args.get("micro_batch_tokens", 8192))
    else:  # SFT-like: a micro-batch is batch_size samples of at most prompt + target length
        tokens = int(data.get("batch_size", 1)) * (int(data.get("max_prompt_length", 1024))
                                                     + int(args.get("max_new_tokens", 64)))
    return Run(
        stage=stage, model_path=str(args.get("model_path", "")),
        trainable=list(args.get("trainable", ["vision", "connector", "llm"])),
        load_dtype=str(load.get("dtype", "float32")), ranks=ranks, sharded=sharded,
        ranks_per_node=min(devices, ranks), accelerator=str(trainer.get("accelerator", "cpu")),
        mixed_bf16=strategy_args.get("mixed_precision") == "bf16" or "bf16" in str(trainer.get("precision", "")),
        checkpointing=bool(load.get("gradient_checkpointing") or strategy_args.get("activation_checkpointing")),
        cpu_offload=bool(strategy_args.get("cpu_offload")),
        optimizer=str((args.get("optimizer") or {}).get("name", "adamw")), kl_coef=float(args.get("kl_coef", 0.0)),
        micro_batch_tokens=tokens, rollout=str(args.get("rollout", "hf")), vllm=dict(args.get("vllm") or {}),
        attn_implementation=str(load.get("attn_implementation") or "sdpa"), lora=dict(args.get("lora") or {}))


def layer_activation_bytes(text, compute: int, native_gqa: bool = False) -> float:
    """Bytes one decoder layer keeps per token for backward (no checkpointing): the tensors autograd
    saves, counted as Korthikanti et al. count them, without the score matrix (SDPA and flash
    attention keep none).
    - attention: the projections' input, q, k and v as the kernel saves them (repeated to every
      query head unless the kernel handles grouped-query attention itself: flash-attn does; SDPA
      does so only without a padding mask, so the bound takes the repeat), the output and o_proj's
      input;
    - SwiGLU MLP: the input, the gate and up outputs, the activated gate and their product;
    - two RMSNorms, each keeping its input and normalised output in float32 (transformers
      upcasts), and under 16-bit compute the normalised output cast back.
    A mixture of experts keeps top_k experts' MLP activations per token."""
    h = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    q = heads * head_dim
    kv = text.num_key_value_heads * head_dim if native_gqa else q
    inner = getattr(text, "moe_intermediate_size", 0) * getattr(text, "num_experts_per_tok", 0) \
        or text.intermediate_size
    attention = h + q + 2 * kv + q + h
    mlp = h + 4 * inner
    norms = 2 * h * (8 + (compute if compute < 4 else 0))
    return compute * (attention + mlp) + norms


def plan(run: Run, counts: dict, text, gpu_memory: float | None, host_memory: float | None) -> dict:
    """Per-rank memory terms in bytes, the peaks, and the verdict."""
    # Under LoRA the adapters add parameters that all train, and the KL reference is the policy
    # with its adapters off (r1v3.lora): no second copy of the model.
    adapters = adapter_params(run, counts)
    lora = bool(run.lora.get("groups"))
    total = counts["total"] + adapters
    trainable = sum(n for group, n in counts["groups"].items() if group in run.trainable) + adapters
    w = max(run.ranks, 1) if run.sharded else 1  # without FSDP every rank holds everything
    master = 4 if run.mixed_bf16 else DTYPE_BYTES[run.load_dtype]  # r1v3 upcasts shards under bf16 compute
    compute = 2 if run.mixed_bf16 or DTYPE_BYTES[run.load_dtype] == 2 else 4
    optimizer_bytes = {"adamw": 2 * master, "adamw8bit": 2}[run.optimizer]
    layers = text.num_hidden_layers
    tokens = run.micro_batch_tokens
    per_layer = layer_activation_bytes(text, compute, native_gqa=run.attn_implementation == "flash_attention_2")
    activations = (tokens * (layers * compute * text.hidden_size + per_layer) if run.checkpointing
                   else tokens * layers * per_layer)
    largest_unit = max((u["largest"] for u in counts["fsdp_units"].values()), default=0)
    terms = {
        "parameters": total * master / w,
        "gradients": trainable * master / w,
        "optimizer": trainable * optimizer_bytes / w,
        # The running unit and the prefetched one, plus the root (embeddings, head), gathered for the
        # whole forward; in backward the unit's and the root's gradients exist whole (float32)
        # until their reduce-scatter.
        "gathered_units": ((2 * largest_unit + counts["fsdp_root"]) * compute
                           + (largest_unit + counts["fsdp_root"]) * 4 * (trainable > 0)) if w > 1 else 0.0,
        "activations": activations,
        "logits": tokens * text.vocab_size * (compute + 8),
        "reference": total * DTYPE_BYTES[run.load_dtype] / w if run.kl_coef > 0 and not lora else 0.0,
    }
    resident = ["parameters", "gradients", "optimizer", "reference"]
    offloaded = {"parameters", "gradients", "optimizer"} if run.cpu_offload and run.accelerator == "gpu" else set()
    device_train = sum(v for k, v in terms.items() if k not in offloaded)
    device_resident = sum(terms[k] for k in resident if k not in offloaded)
    vllm_share, vllm_host = 0.0, 0.0
    if run.rollout == "vllm" and gpu_memory:
        tp = int(run.vllm.get("tensor_parallel_size", 1))
        vllm_share = float(run.vllm.get("gpu_memory_utilization", 0.5)) * gpu_memory
        if run.vllm.get("sleep_mode", True):
            vllm_host = total * 2 / tp  # sleep level 1 parks the bf16 weights in host memory
        else:
            device_train += vllm_share
    terms["vllm_rollout"] = vllm_share
    device_peak = max(device_train, device_resident + vllm_share)
    # The terms of the phase that peaks: the update, or the rollout beside the resident state.
    in_rollout = device_resident + vllm_share > device_train
    asleep_in_updates = {"vllm_rollout"} if vllm_host else set()
    phase = {*resident, "vllm_rollout"} if in_rollout else set(terms) - asleep_in_updates
    peak_terms = {k: terms[k] for k in phase - offloaded}
    host_terms = {
        # FSDP2 over several ranks reads each rank's rows only (r1v3.sharded_load); else the whole
        # checkpoint per rank (its anonymous copy when the load converts dtypes).
        "host_load": total * DTYPE_BYTES[run.load_dtype] / w * (2 if run.kl_coef > 0 and not lora else 1),
        "host_vllm_sleep": vllm_host,
        "host_offload": sum(terms[k] for k in offloaded),
    }
    host_per_rank = max(host_terms["host_load"], host_terms["host_vllm_sleep"] + host_terms["host_offload"])
    if run.accelerator != "gpu":  # a CPU run keeps everything in host memory
        host_per_rank = max(host_per_rank, device_peak)
    host_per_node = host_per_rank * run.ranks_per_node
    problems = []
    if run.accelerator == "gpu" and gpu_memory and device_peak > gpu_memory:
        problems.append(("device", device_peak, gpu_memory, peak_terms))
    if host_memory and host_per_node > host_memory:
        problems.append(("host", host_per_node, host_memory,
                         host_terms if run.accelerator == "gpu" else {**terms, **host_terms}))
    verdict = "fits"
    if problems:
        where, need, have, source = problems[0]
        largest = max(source, key=source.get)
        when = (" in rollouts" if in_rollout else " in updates") if where == "device" else ""
        verdict = (f"does not fit: {where} memory needs {need / GB:.1f} GB per "
                   f"{'rank' if where == 'device' else 'node'}{when}, has {have / GB:.1f} GB; largest term {largest} "
                   f"({source[largest] / GB:.1f} GB)")
    return {"stage": run.stage, "ranks": run.ranks, "sharded": run.sharded, "total_params": total,
            "trainable_params": trainable, "adapter_params": adapters,
            "terms_gb": {k: round(v / GB, 3) for k, v in {**terms, **host_terms}.items()},
            "device_peak_gb": round(device_peak / GB, 3), "host_per_rank_gb": round(host_per_rank / GB, 3),
            "host_per_node_gb": round(host_per_node / GB, 3),
            "fits": not problems, "verdict": verdict}


def plan_config(configs: list[str], overrides: list[str] = (), model: str | None = None, gpus: int | None = None,
                gpu_memory_gb: float | None = None, host_memory_gb: float | None = None) -> dict:
    from r1v3.tools.shapes import load_config

    run = run_of(read_config(configs, overrides), gpus)
    source = model or run.model_path
    if not source:
        raise PlanError("the config names no model.init_args.model_path; pass --model")
    config = load_config(source)
    text = getattr(config, "text_config", config)
    result = plan(run, _counts(source, config), text, gpu_memory_gb * GB if gpu_memory_gb else None,
                  host_memory_gb * GB if host_memory_gb else None)
    return {"model": source, **result}


_COUNTED: dict[str, dict] = {}


def _counts(source: str, config) -> dict:
    """``r1v3 shapes``' counts, once per published shape per process (a 38B meta build takes seconds)."""
    from r1v3.tools.shapes import PUBLISHED, count

    if source not in PUBLISHED:
        return count(config)
    if source not in _COUNTED:
        _COUNTED[source] = count(config)
    return _COUNTED[source]


def machine_memory() -> tuple[float | None, float]:
    """(GPU memory of device 0 in GB or None, host memory in GB) of this machine."""
    import torch

    gpu = torch.cuda.get_device_properties(0).total_memory / GB if torch.cuda.is_available() else None
    return gpu, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def print_plan(result: dict) -> None:
    print(f"{result['model']} ({result['stage']}, {result['ranks']} rank(s)): "
          f"{result['total_params'] / 1e9:.2f}B parameters, {result['trainable_params'] / 1e9:.2f}B trainable")
    for term, gb in result["terms_gb"].items():
        print(f"  {term:<16} {gb:>10.2f} GB" + ("  per rank" if not term.startswith("host") else "  per rank, host"))
    print(f"  device peak      {result['device_peak_gb']:>10.2f} GB per rank")
    print(f"  host             {result['host_per_node_gb']:>10.2f} GB per node")
    print(f"verdict: {result['verdict']}")


def plan_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1v3 plan", description=(
        "Per-rank memory of a run (parameters, gradients, optimizer states, activations, logits, reference, "
        "vLLM, host memory at load) from its config, on the meta device, and whether it fits."))
    parser.add_argument("--config", action="append", required=True, help="a config file (repeatable, merged in order)")
    parser.add_argument("--model", help="a published shape (r1v3 shapes) or checkpoint directory instead of "
                        "the config's model_path")
    parser.add_argument("--gpus", type=int, help="total ranks (default: trainer.devices x trainer.num_nodes)")
    parser.add_argument("--gpu-memory", type=float, help="GB per GPU")
    parser.add_argument("--host-memory", type=float, help="GB of host memory per node")
    parser.add_argument("--json", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    try:
        result = plan_config(args.config, overrides, args.model, args.gpus, args.gpu_memory, args.host_memory)
    except PlanError as err:
        print(f"r1v3 plan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result)) if args.json else print_plan(result)
    return 0


def check_before_fit(argv: list[str]) -> str | None:
    """``r1v3 fit --plan ...``: the one error line when the run cannot fit on this machine (None if it
    fits), decided before any weight loads."""
    configs, overrides, it = [], [], iter(argv)
    for arg in it:
        if arg in ("--config", "-c"):
            configs.append(next(it, ""))
        elif arg.startswith("--config="):
            configs.append(arg.split("=", 1)[1])
        elif arg.startswith("-"):
            overrides.append(arg)
        elif overrides:  # the value of the override before it
            overrides.append(arg)
    gpu, host = machine_memory()
    result = plan_config(configs, overrides, gpu_memory_gb=gpu, host_memory_gb=host)
    return None if result["fits"] else f"plan: {result['verdict']} (see `r1v3 plan`)"


if __name__ == "__main__":
    sys.exit(plan_main())
