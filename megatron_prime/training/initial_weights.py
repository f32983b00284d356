"""Where PRIME's three models take their starting weights, and loading them: an HF checkpoint dir or
a Megatron checkpoint dir (any TP/PP) for the policy, the implicit PRM and the reference."""

from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_prime.bridge.hf_io import SafetensorsSource
from megatron_prime.bridge.mcore_io import META_FILE, load_model
from megatron_prime.bridge.transfer import load_hf_weights
from megatron_prime.config import Config, ConfigError
from megatron_prime.models.wrappers import unwrap
from megatron_prime.passes.trainable import TrainableModel
from megatron_prime.platform import watchdog
from megatron_prime.training import checkpoint


@dataclass
class WeightSources:
    """Where each of PRIME's three models takes its starting weights: an HF checkpoint dir or a
    Megatron checkpoint dir (``model.mcore_path`` style)."""

    policy: str
    prm: str
    reference: str


def weight_sources(cfg: Config) -> WeightSources:
    """The policy starts from ``model.mcore_path`` or ``model.hf_path``. The PRM and the reference
    start where the policy's run started (paper: all three from the SFT model), unless
    ``model.prm_mcore_path`` / ``model.prm_hf_path`` / ``model.ref_path`` say otherwise.

    When ``model.mcore_path`` is the policy of a trainer checkpoint (e.g. to continue at another
    TP/PP), its PRM is that checkpoint's ``prm/`` and its reference is the reference that run
    recorded: never the trained policy of step N, which would measure every implicit reward
    and KL against the wrong model."""
    m = cfg.model
    policy = m.mcore_path or m.hf_path
    prm, reference = m.prm_mcore_path or m.prm_hf_path, m.ref_path
    trainer_ckpt = checkpoint.trainer_checkpoint_of(m.mcore_path) if m.mcore_path else None
    if trainer_ckpt is not None:
        prm = prm or trainer_ckpt.get("prm", "")
        reference = reference or trainer_ckpt["reference"]
        if not os.path.isdir(reference):
            raise ConfigError(f"model.mcore_path={m.mcore_path} is a trainer checkpoint whose reference model was "
                              f"{reference}, which does not exist here: set model.ref_path to that model (the "
                              f"original starting checkpoint)")
    return WeightSources(policy=policy, prm=prm or policy, reference=reference or policy)


def load_initial_weights(target, path: str, arch, cfg: Config) -> None:
    """Weights of a trainable or frozen model from ``path``: a Megatron checkpoint dir (any TP/PP)
    or an HF checkpoint dir."""
    model = unwrap(target.model if isinstance(target, TrainableModel) else target)
    watchdog.heartbeat()  # each model of the start-up loads in its own time
    if os.path.exists(os.path.join(path, META_FILE)):
        load_model(model, path)
    else:
        source = SafetensorsSource(path, arch)
        source.check_shapes()
        load_hf_weights(model, arch, source, cfg.model.vocab_pad_multiple)
    if isinstance(target, TrainableModel):
        # In bf16/fp16 the optimizer holds fp32 main copies taken when it was built; without this
        # its first step would write the random initialisation back over the checkpoint.
        target.optimizer.reload_model_params()
