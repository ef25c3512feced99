"""The adapter hyper-parameters shared by every method (the `adapter.*` config keys)."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field

from mode.errors import ModeError


@dataclass
class AdapterConfig:
    method: str = "lora"
    rank: int = 8                      # r (for MoRE: the maximum rank R)
    experts: int = 1                   # m
    block_rank: int = 1                # p, MoDE only: rank slots per router; must divide r
    alpha: float = 16.0                # scale s = alpha / rank
    dropout: float = 0.0               # on the adapter branch's input only
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    init_A: str = "kaiming_uniform"    # kaiming_uniform (PEFT's LoRA default) | normal (N(0, init_std))
    init_std: float = 0.02
    router_init_std: float = 0.02      # routers (and MoRE's selector) ~ N(0, router_init_std) (MoLoRA reference)
    num_tasks: int | None = None       # MoRE: tasks the selector knows (mode-train sets it from the data)
    contrastive_weight: float = 0.1    # MoRE: L = L_gen + contrastive_weight * L_con (paper: 0.1)
    contrastive_temperature: float = 0.05  # MoRE: temperature of the contrastive loss (paper: 0.05)
    task_embedding: str = "per_module"  # MoRE: per_module ([T, P] per projection, released code) | shared (one table)
    # Routing options of the mixtures (molora, molora_sd, mode); LoRA and MoRE refuse non-defaults
    top_k: int | None = None           # keep each router's k largest logits, softmax over them (null: dense)
    router_temperature: float = 1.0    # gates = softmax(logits / router_temperature)
    balance_loss_weight: float = 0.0   # + w * Switch load-balancing loss m * sum_i f_i P_i
    z_loss_weight: float = 0.0         # + w * router z-loss: mean over tokens of logsumexp(logits)^2
    router_input: str = "token"        # token | task: routers read the token, or a learned per-task embedding

    @classmethod
    def from_mapping(cls, cfg) -> AdapterConfig:
        """Accept a dict, DictConfig or AdapterConfig. An unknown key is an error naming it: a typo such as
        `block_rnak` would otherwise train another adapter than the one asked for, without a word."""
        if isinstance(cfg, AdapterConfig):
            return cfg
        if hasattr(cfg, "items") and not isinstance(cfg, dict):
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        known = [f.name for f in dataclasses.fields(cls)]
        cfg = dict(cfg)
        legacy = cfg.pop("extra", None)  # configs before 0.2 carried an (always empty) `extra: {}`
        unknown = [k for k in cfg if k not in known] + [f"extra.{k}" for k in (legacy or {})]
        if unknown:
            close = difflib.get_close_matches(unknown[0].removeprefix("extra."), known, n=1)
            hint = f" (did you mean adapter.{close[0]}?)" if close else f"; the keys are {', '.join(known)}"
            raise ModeError(f"adapter.{unknown[0]} is not an adapter key{hint}")
        if "target_modules" in cfg:
            cfg["target_modules"] = list(cfg["target_modules"])
        out = cls(**cfg)
        out.validate()
        return out

    def validate(self) -> None:
        from mode.adapters.registry import METHODS

        if self.method not in METHODS:
            raise ModeError(f"adapter.method={self.method!r} is not one of {sorted(METHODS)}")
        for key in ("rank", "experts", "block_rank"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ModeError(f"adapter.{key}={value!r} must be an integer >= 1")
        if self.rank % self.block_rank:
            raise ModeError(f"adapter.block_rank={self.block_rank} must divide adapter.rank={self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModeError(f"adapter.dropout={self.dropout!r} must be in [0, 1)")
        if not self.target_modules:
            raise ModeError("adapter.target_modules is empty")
        if self.init_A not in ("kaiming_uniform", "normal"):
            raise ModeError(f"adapter.init_A={self.init_A!r} is not one of ['kaiming_uniform', 'normal']")
        if self.num_tasks is not None and (not isinstance(self.num_tasks, int) or self.num_tasks < 1):
            raise ModeError(f"adapter.num_tasks={self.num_tasks!r} must be an integer >= 1 (or null)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ModeError(f"adapter.top_k={self.top_k!r} must be an integer >= 1 (or null: a dense softmax)")
        if not (_is_number(self.router_temperature) and self.router_temperature > 0):
            raise ModeError(f"adapter.router_temperature={self.router_temperature!r} must be a number > 0")
        for key in ("balance_loss_weight", "z_loss_weight"):
            if not (_is_number(getattr(self, key)) and getattr(self, key) >= 0):
                raise ModeError(f"adapter.{key}={getattr(self, key)!r} must be a number >= 0")
        if self.task_embedding not in ("per_module", "shared"):
            raise ModeError(f"adapter.task_embedding={self.task_embedding!r} is not one of ['per_module', 'shared']")
        if self.task_embedding != "per_module" and self.method != "more":
            raise ModeError(f"adapter.task_embedding={self.task_embedding!r} is a MoRE option (adapter.method='more'), "
                            f"not one of adapter.method={self.method!r}; leave it at 'per_module'")
        if self.router_input not in ("token", "task"):
            raise ModeError(f"adapter.router_input={self.router_input!r} is not one of ['token', 'task']")
        METHODS[self.method].check_config(self)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The mixtures' routing keys and their defaults (the value that means "option off")
ROUTING_KEYS = {f.name: f.default for f in dataclasses.fields(AdapterConfig)
                if f.name in ("top_k", "router_temperature", "balance_loss_weight", "z_loss_weight", "router_input")}
