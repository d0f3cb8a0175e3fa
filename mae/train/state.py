"""What a checkpoint holds, sharded (FSDP) or not: full (unsharded) weights keyed like `model.state_dict()`,
optimizer state keyed by parameter name (the format of `torch.distributed.checkpoint.state_dict`), and each
process's RNG states. A run can therefore resume with or without sharding and on another number of processes,
and `mae.export` / `model.init` read its checkpoints as any other."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from mae.config import ConfigError
from mae.train.fsdp import is_sharded


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights on the CPU. Sharded: a collective (every rank calls it); rank 0 gets the tensors and the
    other ranks an empty dict."""
    if not is_sharded(model):
        return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full weights (every rank holds them) into the model, sharded or not; keys must match exactly."""
    if not is_sharded(model):
        model.load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(strict=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, groups: list[dict]) -> dict:
    """Full optimizer state keyed by parameter name. Sharded: a collective; rank 0 gets it, the others {}.
    `groups` are the optimizer's parameter groups with their "names" (mae.train.optim.param_groups)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    return _by_name(optimizer.state_dict(), _names(groups))


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, groups: list[dict], state: dict
) -> list[str]:
    """Load a full optimizer state (keyed by name, or by index as `optimizer.state_dict()` writes it): each
    parameter's state (moments, step counts) from `state`, the groups' settings (weight decay, betas, lr scale)
    from the optimizer as this run built it, so a resumed run uses the values its config.yaml records. Returns
    one line per setting that differs from the checkpoint's (empty when none does).

    The parameter grouping may differ from the checkpoint's (layer decay switched on or off); another optimizer
    (AdamW's moments into LARS) is an error."""
    names = _names(groups)
    by_name = _by_name(state, _checkpoint_names(state, names)) if _by_index(state) else state
    current = [{k: v for k, v in g.items() if k != "params"} for g in inner_optimizer(optimizer).param_groups]
    changes = _changes(by_name["param_groups"], current, [g["names"] for g in groups])
    merged = {
        "state": by_name["state"],
        "param_groups": [{**g, "params": list(gn["names"])} for g, gn in zip(current, groups)],
    }
    unknown = [n for n in merged["state"] if n not in set(names)]
    if unknown:
        raise ValueError(f"optimizer state for parameters this model lacks: {', '.join(unknown[:3])}")
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, merged, options=_options())
    else:
        index = {n: i for i, n in enumerate(names)}
        optimizer.load_state_dict(
            {
                "state": {index[n]: s for n, s in merged["state"].items()},
                "param_groups": [
                    {**g, "params": [index[n] for n in g["params"]]} for g in merged["param_groups"]
                ],
            }
        )
    return changes


# The optimizer-group settings that come from the config, and the key that sets them.
_GROUP_SETTINGS = {
    "weight_decay": "train.weight_decay",
    "betas": "train.betas",
    "lr_scale": "train.layer_decay",
}


def _changes(saved: list[dict], current: list[dict], current_names: list[list[str]]) -> list[str]:
    """Lines naming each config key whose group settings differ between the checkpoint and this run."""
    adamw = ["betas" in g for g in saved], ["betas" in g for g in current]
    if saved and current and adamw[0][0] != adamw[1][0]:
        was, now = ("adamw", "lars") if adamw[0][0] else ("lars", "adamw")
        raise ConfigError(
            f"train.optimizer={now}, but the checkpoint holds {was}'s state; resume with train.optimizer={was} "
            "or start a new output_dir"
        )
    old = {n: g for g in saved for n in g["params"]}
    out = []
    for field, key in _GROUP_SETTINGS.items():
        pairs = {
            (_plain(old[n].get(field)), _plain(g.get(field)))
            for g, ns in zip(current, current_names)
            for n in ns
            if n in old
        }
        diff = sorted((a, b) for a, b in pairs if a != b)
        if diff:
            shown = ", ".join(f"{a} -> {b}" for a, b in diff[:3]) + (" ..." if len(diff) > 3 else "")
            out.append(
                f"{key} changed since the checkpoint ({field} {shown}): the resumed optimizer uses the new value"
            )
    return out


def _plain(v):
    if isinstance(v, (list, tuple)):
        return tuple(round(float(x), 10) for x in v)
    return round(float(v), 10) if isinstance(v, (int, float)) else v


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _by_index(state: dict) -> bool:
    return any(isinstance(g["params"][0], int) for g in state["param_groups"] if g["params"])


def _checkpoint_names(state: dict, names: list[str]) -> list[str]:
    """An index-keyed state's parameter names: the checkpoint had this run's parameters in this order."""
    count = sum(len(g["params"]) for g in state["param_groups"])
    if count != len(names):
        raise ValueError(f"optimizer state for {count} parameters, the model has {len(names)}")
    return names


def _names(groups: list[dict]) -> list[str]:
    return [n for g in groups for n in g["names"]]


def _by_name(state: dict, names: list[str]) -> dict:
    return {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
