"""``megatron-prime plan CONFIG --gpus N --gpu-mem 80 [key=value ...]``: the layout (which ranks
do what), the per-GPU memory of each phase, and one line saying whether it fits and, if not,
which TP/PP/micro-batch settings (and how many GPUs) do. ``--show-config`` adds the validated
config (the launch scripts' dry runs use it).

Exit status: 0 fits, 1 does not fit, 2 the config or layout is refused.
"""

from __future__ import annotations

import argparse
from typing import Callable, Collection

import yaml

from megatron_prime.config import Config, ConfigError, config_to_dict, load_config
from megatron_prime.errors import exit_code
from megatron_prime.models.hf_config import HFArch
from megatron_prime.planner.plan import MAX_NODES, Layout, fitting_layouts, format_plan, gib, plan_layout, verdict
from megatron_prime.planner.shapes import model_shape
from megatron_prime.planner.state_memory import num_parameters, padded_vocab


def _ranges(ranks: list[int]) -> str:
    return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])


def format_layout(cfg: Config, arch: HFArch, gpus: int, gpus_per_node: int) -> str:
    """Who does what: megatron-core's rank order is TP fastest, then DP, then PP."""
    p, r = cfg.parallel, cfg.rollout
    dp = gpus // (p.tp * p.pp)
    lines = [f"layout: {gpus} GPUs = {-(-gpus // gpus_per_node)} node(s) x {gpus_per_node}; TP={p.tp} PP={p.pp} "
             f"DP={dp} (rank = tp + {p.tp}*(dp + {dp}*pp)); sequence parallel "
             f"{'on' if p.sequence_parallel else 'off'}; distributed optimizer "
             + ("off (LoRA adapters: their optimizers are whole on every rank)" if cfg.model.lora.enabled
                else 'on' if p.distributed_optimizer else 'off')]
    per_stage = arch.num_layers // p.pp
    for stage in range(p.pp):
        replicas = [list(range(p.tp * (d + dp * stage), p.tp * (d + dp * stage) + p.tp)) for d in range(dp)]
        shown = ", ".join(_ranges(x) for x in replicas[:4]) + (", ..." if dp > 4 else "")
        lines.append(f"  pipeline stage {stage}: layers {stage * per_stage}-{(stage + 1) * per_stage - 1}, "
                     f"ranks {_ranges(replicas[0][:1] + replicas[-1][-1:])}; TP groups (one per DP rank): {shown}")
    if r.mode == "remote":
        lines.append(f"  rollout: {len(r.remote_urls)} remote SGLang server(s) (TP={r.tp} each)"
                     f"{' behind ' + r.router_url if r.router_url else ''}; rank 0 broadcasts the weights over NCCL")
    else:
        per = r.tp if r.engine != "hf" else 1
        groups = [list(range(i, i + per)) for i in range(0, gpus, per)]
        shown = ", ".join(f"{i}: ranks {_ranges(g)}" for i, g in enumerate(groups[:8])) + (", ..." if len(groups) > 8 else "")
        lines.append(f"  rollout: {len(groups)} colocated {r.engine} engine(s) x TP={per} ({shown})")
    return "\n".join(lines)


def plan_command(argv: list[str], *, validate_run: Callable, outcome_only: Collection[str]) -> int:
    parser = argparse.ArgumentParser(prog="megatron-prime plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config (see examples/configs)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=4")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job (ranks)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--show-config", action="store_true", help="print the validated config too")
    args = parser.parse_intermixed_args(argv)
    return exit_code(lambda: _plan(args, validate_run, outcome_only))


def _plan(args, validate_run, outcome_only) -> int:
    cfg = load_config(args.config, args.overrides)
    arch, source = model_shape(cfg)
    validate_run(cfg, None, arch=arch)  # what holds on any number of GPUs
    uses_prm = cfg.algorithm.estimator not in outcome_only
    uses_reference = uses_prm or cfg.algorithm.kl_coef > 0
    vocab = padded_vocab(arch.vocab_size, cfg.parallel.tp, cfg.model.vocab_pad_multiple)
    print(f"model: {arch.architecture}, {num_parameters(arch) / 1e9:.2f}B parameters ({arch.num_layers} layers, "
          f"hidden {arch.hidden_size}, {arch.num_heads} heads / {arch.num_kv_heads} KV groups, MLP "
          f"{arch.ffn_hidden_size}, vocab {arch.vocab_size} padded to {vocab}); shape from {source}")
    if cfg.model.lora.enabled:
        print(f"models on every rank: one frozen base (the reference) + LoRA adapters: policy"
              f"{' + PRM' if uses_prm else ''} (model.lora.rank={cfg.model.lora.rank}, "
              f"algorithm.estimator={cfg.algorithm.estimator})")
    else:
        print(f"models on every rank: policy{' + PRM' if uses_prm else ''}{' + reference' if uses_reference else ''} "
              f"(algorithm.estimator={cfg.algorithm.estimator})")
    search = dict(gpus=args.gpus, gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem, uses_prm=uses_prm,
                  uses_reference=uses_reference)
    try:
        validate_run(cfg, args.gpus, arch=arch, ranks_per_node=args.gpus_per_node)
    except ConfigError as e:
        print(f"CANNOT RUN on {args.gpus} GPUs ({args.gpus_per_node} per node): {e}")
        _print_alternatives(fitting_layouts(cfg, arch, **search), args)
        return 1
    print(format_layout(cfg, arch, args.gpus, args.gpus_per_node))
    if args.show_config:
        print("validated config:")
        print("  " + yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip().replace("\n", "\n  "))
    layout = Layout(args.gpus, args.gpus_per_node, cfg.parallel.tp, cfg.parallel.pp, cfg.train.micro_batch_tokens,
                    cfg.parallel.ep)
    plan = plan_layout(cfg, arch, layout, gpu_mem_gib=args.gpu_mem, uses_prm=uses_prm, uses_reference=uses_reference)
    print(format_plan(plan, cfg, arch))
    print(verdict(plan))
    if plan.fits:
        return 0
    _print_alternatives(fitting_layouts(cfg, arch, **search), args)
    return 1


def _print_alternatives(plans, args) -> None:
    if not plans:
        print(f"no TP/PP/micro-batch layout fits on up to {MAX_NODES * args.gpus_per_node} GPUs of {args.gpu_mem:g} GiB")
    elif plans[0].layout.gpus > args.gpus:
        print(f"no TP/PP/micro-batch layout fits on {args.gpus} GPUs; the fewest that fit: {plans[0].layout.gpus} "
              f"({plans[0].layout.gpus // args.gpus_per_node} nodes of {args.gpus_per_node})")
    for alt in plans:
        lay = alt.layout
        ep = f" parallel.ep={lay.ep}" if lay.ep > 1 else ""
        print(f"  fits: {lay.describe()}, peak {gib(alt.peak)} GiB ({alt.peak_phase}): --gpus {lay.gpus} "
              f"parallel.tp={lay.tp} parallel.pp={lay.pp}{ep} train.micro_batch_tokens={lay.micro_batch_tokens}")
