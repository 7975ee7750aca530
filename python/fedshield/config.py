"""Run configuration in sections (model, data, lora, training, pruning, he, keys, dp, engine).

Every section is a frozen dataclass whose fields all have a default and help text and which
validates itself, naming the bad value (as peft's configs do). :class:`RunConfig` holds the
sections and checks what spans them. Each field has one command-line flag (``flag`` in its
metadata, else ``SECTION_FIELD``); the CLI is generated from these fields, and the flag names
are also the keys of the flat JSON configs of earlier fedshield versions, which still load.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from .data.files import parse_columns
from .data.prompts import MIN_PROMPT_TOKENS, MIN_SEQUENCE_TOKENS
from .base.errors import ParameterError
from .he.params import DEFAULT_LOG_QUERIES, CKKSParams
from .base.validate import is_int, is_real

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def _opt(default, help: str, *, flag: str | None = None, choices: tuple | None = None,
         metavar: str | None = None):
    """A config field: default, help text, and optionally its flag name and choices."""
    meta = {"help": help}
    if flag is not None:
        meta["flag"] = flag
    if choices is not None:
        meta["choices"] = choices
    if metavar is not None:
        meta["metavar"] = metavar
    if isinstance(default, (list, dict)):
        raise TypeError("mutable defaults are not allowed in frozen configs")
    return field(default=default, metadata=meta)


def _check_choices(section) -> None:
    for f in fields(section):
        choices = f.metadata.get("choices")
        value = getattr(section, f.name)
        if choices is not None and value not in choices:
            raise ParameterError(f"{_flag_name(type(section), f)}={value!r} is not one of "
                                 f"{choices}")


def _positive_ints(section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not is_int(value) or value < 1:
            raise ParameterError(f"{name}={value!r} must be a positive int")


def check_max_len(max_len: int, flag: str = "max_len") -> None:
    """The shortest max_len that can hold any example (the rest is the data's business: an
    example whose answer does not fit is skipped, and a file of only those stops the run)."""
    if max_len < MIN_SEQUENCE_TOKENS:
        raise ParameterError(f"{flag}={max_len} is too short: a training example needs at least "
                             f"{MIN_SEQUENCE_TOKENS} tokens (bos, {MIN_PROMPT_TOKENS} prompt "
                             "tokens, one answer token, eos)")


def _finite(value, name: str, *, low: float = -math.inf, high: float = math.inf,
            low_open: bool = False) -> None:
    ok = (is_real(value)
          and math.isfinite(value) and (value > low if low_open else value >= low)
          and value <= high)
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise ParameterError(f"{name}={value!r} must be a finite number {bound}"
                             + (f" and <= {high:g}" if math.isfinite(high) else ""))


@dataclass(frozen=True)
class ModelConfig:
    """The base model and where it trains."""

    name: str = _opt("tiny", "'tiny' (a small Llama built from a config) or a local model "
                     "directory", flag="model")
    dtype: str = _opt("fp32", "base model weights", flag="dtype", choices=("fp32", "bf16"))
    quantize: str = _opt("none", "load --model in 8bit or 4bit (bitsandbytes on a CUDA GPU; "
                         "QLoRA-style)", flag="quantize", choices=("none", "8bit", "4bit"))
    device: str = _opt("auto", "where the model trains: auto (cuda when available), cpu, cuda",
                       flag="device", choices=("auto", "cpu", "cuda"))
    grad_checkpointing: bool = _opt(False, "recompute activations in the backward pass (less "
                                    "memory, more compute)", flag="grad_checkpointing")
    template: str = _opt("auto", "prompt template: alpaca, compact (alpaca without its preamble "
                         "sentence), auto = compact for the tiny model, alpaca otherwise",
                         flag="template", choices=("auto", "alpaca", "compact"))

    def __post_init__(self) -> None:
        _check_choices(self)
        if not isinstance(self.name, str) or not self.name:
            raise ParameterError(f"model={self.name!r} must be 'tiny' or a local directory")
        if self.quantize != "none" and self.name == "tiny":
            raise ParameterError(f"quantize={self.quantize!r} applies to a --model directory, "
                                 "not the tiny demo model")
        if self.quantize != "none" and self.device == "cpu":
            raise ParameterError(f"quantize={self.quantize!r} needs a CUDA GPU; device='cpu' "
                                 "was asked for")

    @property
    def compact_template(self) -> bool:
        """The alpaca template without its preamble (keeps the tiny demo's sequences short)."""
        return self.template == "compact" or (self.template == "auto" and self.name == "tiny")


@dataclass(frozen=True)
class DataConfig:
    """Each site's instruction data: its own file, or a share of one data set."""

    path: str = _opt("synthetic", "'synthetic' (generated) or a local file split among the "
                     "sites (see --split)", flag="data")
    site_data: tuple = _opt((), "one site's own data file (.json, .jsonl, .csv, .parquet); "
                            "give it once per site: the number of sites is the number of "
                            "files", flag="site_data", metavar="FILE")
    clients: int = _opt(3, "sites the data set is split into (ignored with --site-data)",
                        flag="clients")
    split: str = _opt("auto", "how one data set is split into sites: tasks (each site mostly "
                      "one task; needs a task field), iid, dirichlet (Dirichlet(alpha) over "
                      "the task field, else hashed instructions); auto = tasks for synthetic "
                      "data, iid for a file", flag="split",
                      choices=("auto", "tasks", "iid", "dirichlet"))
    dirichlet_alpha: float = _opt(0.5, "split=dirichlet: concentration (small = more skewed)",
                                  flag="dirichlet_alpha")
    columns: str = _opt("", "FIELD=COLUMN pairs naming a data file's columns, e.g. "
                        "'instruction=question,output=answer' (fields: instruction, input, "
                        "output, task)", flag="columns")
    examples_per_client: int = _opt(96, "synthetic data: examples generated per site",
                                    flag="examples_per_client")
    eval_fraction: float = _opt(0.2, "fraction of each site's examples it holds out for "
                                "evaluation (at least one)", flag="eval_fraction")
    max_len: int = _opt(96, "tokens per example (longer prompts are cut from the left)",
                        flag="max_len")

    def __post_init__(self) -> None:
        _check_choices(self)
        _positive_ints(self, "clients", "examples_per_client", "max_len")
        check_max_len(self.max_len)
        if not isinstance(self.path, str) or not self.path:
            raise ParameterError(f"data={self.path!r} must be 'synthetic' or a local file")
        if isinstance(self.site_data, (str, bytes)) or not all(
                isinstance(p, str) and p for p in self.site_data):
            raise ParameterError(f"site_data={self.site_data!r} must be a list of file paths")
        object.__setattr__(self, "site_data", tuple(self.site_data))
        if len(set(self.site_data)) != len(self.site_data):
            raise ParameterError(f"site_data={list(self.site_data)} names a file twice")
        if self.site_data and self.path != "synthetic":
            raise ParameterError(f"data={self.path!r} and site_data: give one data set to "
                                 "split, or each site's own file, not both")
        _finite(self.dirichlet_alpha, "dirichlet_alpha", low=0, low_open=True)
        _finite(self.eval_fraction, "eval_fraction", low=0, high=0.9, low_open=True)
        parse_columns(self.columns)
        if self.columns and self.path == "synthetic" and not self.site_data:
            raise ParameterError(f"columns={self.columns!r} applies to a --data file only "
                                 "(or --site-data files)")

    @property
    def n_sites(self) -> int:
        return len(self.site_data) or self.clients


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (the paper's defaults: r=32, alpha=64 on q_proj/v_proj)."""

    r: int = _opt(32, "LoRA rank", flag="lora_r")
    alpha: float = _opt(64.0, "LoRA alpha", flag="lora_alpha")
    dropout: float = _opt(0.05, "LoRA dropout", flag="lora_dropout")
    targets: str = _opt("", "comma-separated target modules (empty = per architecture: "
                        "q_proj,v_proj for llama/mistral/qwen2, c_attn for gpt2)",
                        flag="lora_targets")

    def __post_init__(self) -> None:
        _positive_ints(self, "r")
        _finite(self.alpha, "lora_alpha", low=0, low_open=True)
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ParameterError(f"lora_dropout={self.dropout!r} must be in [0, 1)")
        if not isinstance(self.targets, str):
            raise ParameterError(f"lora_targets={self.targets!r} must be a string like "
                                 "'q_proj,v_proj'")
        if any(not t.strip() for t in self.targets.split(",")) and self.targets:
            raise ParameterError(f"lora_targets={self.targets!r}: empty module name")

    @property
    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",")] if self.targets else []


@dataclass(frozen=True)
class TrainingConfig:
    """Rounds, local training and the federated algorithm."""

    rounds: int = _opt(4, "federated rounds", flag="rounds")
    local_steps: int = _opt(50, "optimizer steps per site per round", flag="local_steps")
    batch_size: int = _opt(8, "examples per step", flag="batch_size")
    grad_accum: int = _opt(1, "gradient accumulation steps", flag="grad_accum")
    lr: float = _opt(1e-2, "peak learning rate (cosine-decayed over rounds)", flag="lr")
    lr_min: float = _opt(1e-3, "final learning rate", flag="lr_min")
    algorithm: str = _opt("delta", "delta: weighted FedAvg of updates; paper: unweighted average "
                          "of pruned weights replaces the global state; ffa: FFA-LoRA, A frozen "
                          "from the shared seed, only B trained and sent (exact aggregation, "
                          "half the payload)", flag="algorithm", choices=("delta", "paper", "ffa"))
    seed: int = _opt(0, "seed of data, model, LoRA init and training", flag="seed")
    samples: int = _opt(2, "held-out prompts answered by the global model after every round "
                        "(0 = none; local engine)", flag="samples")
    sample_tokens: int = _opt(32, "tokens generated per sample", flag="sample_tokens")

    def __post_init__(self) -> None:
        _check_choices(self)
        _positive_ints(self, "rounds", "local_steps", "batch_size", "grad_accum")
        if not is_int(self.seed):
            raise ParameterError(f"seed={self.seed!r} must be an int")
        if not (isinstance(self.lr, (int, float)) and isinstance(self.lr_min, (int, float))
                and self.lr > 0 and 0 <= self.lr_min <= self.lr and math.isfinite(self.lr)):
            raise ParameterError(f"lr={self.lr!r}, lr_min={self.lr_min!r}: need "
                                 "0 <= lr_min <= lr, lr > 0")
        for name in ("samples", "sample_tokens"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ParameterError(f"{name}={value!r} must be an int >= 0")


@dataclass(frozen=True)
class PruningConfig:
    """The paper's magnitude pruning and its schedule p_t."""

    mode: str = _opt("local", "local: each site's own mask (sent densely); global: one mask "
                     "from the previous global state (smaller ciphertexts); off", flag="prune",
                     choices=("local", "global", "off"))
    p0: float = _opt(0.2, "pruned fraction at t_start", flag="prune_p0")
    target: float = _opt(0.5, "pruned fraction from t_end on", flag="prune_target")
    t_start: int = _opt(1, "first round that prunes (nothing is pruned before it)",
                        flag="prune_t_start")
    # 0 = the run's last round: the reference code's run script ends its schedule with the run
    # (num_rounds=200, pruning_end_round=200; solidlabnetwork/fedshield-llm, run_scripts/fed.sh
    # and config.py), so --rounds alone keeps the paper's 20% -> 50% over any run length.
    t_end: int = _opt(0, "round where the target is reached (0 = the run's last round, "
                      "following --rounds)", flag="prune_t_end")

    def __post_init__(self) -> None:
        _check_choices(self)
        _finite(self.p0, "prune_p0", low=0, high=1)
        _finite(self.target, "prune_target", low=0, high=1)
        _positive_ints(self, "t_start")
        if not is_int(self.t_end) or self.t_end < 0:
            raise ParameterError(f"prune_t_end={self.t_end!r} must be an int >= 0 (0 = the "
                                 "run's last round)")
        if self.t_end and self.t_end <= self.t_start:
            raise ParameterError(f"prune_t_end={self.t_end} must be greater than "
                                 f"prune_t_start={self.t_start} (or 0: the run's last round)")


@dataclass(frozen=True)
class HEConfig:
    """CKKS encryption of the updates."""

    enabled: bool = _opt(True, "encrypt updates with CKKS (--no-he: plaintext FedAvg baseline)",
                         flag="he")
    tolerance: float = _opt(1e-6, "how far a decrypted average may be from the plaintext one "
                            "(absolute, values of magnitude <= 1): the CKKS parameters are chosen "
                            "for it, and a decryption that could miss it is refused",
                            flag="he_tolerance")
    ring_dim: int = _opt(0, "CKKS ring dimension (0 = the smallest that holds the modulus the "
                         "tolerance needs)", flag="ring_dim")
    scale_bits: int = _opt(0, "CKKS scale bits (0 = chosen for the tolerance)", flag="scale_bits")
    flood_bits: int = _opt(-1, "noise flooding of every decryption at this statistical "
                           "security level in bits (IND-CPA^D protection, ~2.7x the bytes: 3 "
                           "RNS towers); 0 = off; -1 = auto: 30 with threshold keys, whose "
                           "partial decryptions leave the parties, off with shared keys, whose "
                           "decryptions stay with the key holders", flag="flood_bits")
    decryption_budget: int = _opt(DEFAULT_LOG_QUERIES, "log2 of the ciphertexts each key may decrypt (the "
                                  "flooding bound's query count); the parties count them on "
                                  "disk, and the server rotates the keys (a new key epoch) "
                                  "before a round would exceed it", flag="decryption_budget")

    def __post_init__(self) -> None:
        if (not is_int(self.decryption_budget)
                or not 0 <= self.decryption_budget <= 40):
            raise ParameterError(f"decryption_budget={self.decryption_budget!r} must be an int "
                                 "in [0, 40] (log2 of the decryptions per key)")
        for name in ("ring_dim", "scale_bits", "flood_bits"):
            value = getattr(self, name)
            if not is_int(value):
                raise ParameterError(f"{name}={value!r} must be an int")
        _finite(self.tolerance, "he_tolerance", low=0, high=0.5, low_open=True)
        if self.ring_dim < 0:
            raise ParameterError(f"ring_dim={self.ring_dim!r} must be 0 (auto) or a power of two")
        if self.flood_bits < -1:
            raise ParameterError(f"flood_bits={self.flood_bits!r} must be -1 (auto), 0 (off) or "
                                 "a statistical security level in bits")
        if self.scale_bits < 0:
            raise ParameterError(f"scale_bits={self.scale_bits!r} must be 0 (auto) or positive")
        if self.flood_bits > 0 and not self.enabled:
            raise ParameterError(f"flood_bits={self.flood_bits} floods decryptions; it needs HE "
                                 "on (drop --no-he)")


@dataclass(frozen=True)
class KeysConfig:
    """Who holds the secret key."""

    mode: str = _opt("shared", "shared: one key on every site (paper mode, weaker); threshold: "
                     "each site holds a key share, decryption needs partial decryptions",
                     flag="keys", choices=("shared", "threshold"))
    threshold: int = _opt(0, "threshold keys: shares T needed to decrypt, sites/2 < T <= "
                          "sites (0 = every site, so none may drop out)", flag="threshold")
    dropouts: int = _opt(0, "threshold keys, local engine: sites K (ids 0..K-1, the lead among "
                         "them) absent at decryption each round; needs --threshold T with "
                         "T <= sites - K, e.g. --clients 3 --threshold 2 --dropouts 1",
                         flag="dropouts")
    setup: str = _opt("protocol", "protocol: every site makes its key material on its own node "
                      "(threshold: the multiparty key generation chain and sealed Shamir "
                      "dealing, checked by joint test decryptions); dealer: one process makes "
                      "every key (a simulation shortcut: that process sees all of them)",
                      flag="key_setup", choices=("protocol", "dealer"))
    verify: bool = _opt(False, "each key holder also receives the signed updates and "
                        "recomputes the aggregate before decrypting it (costs their bytes per "
                        "party and round)", flag="verify_aggregates")

    def __post_init__(self) -> None:
        _check_choices(self)
        for name in ("threshold", "dropouts"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ParameterError(f"{name}={value!r} must be an int >= 0")
        if not isinstance(self.verify, bool):
            raise ParameterError(f"verify_aggregates={self.verify!r} must be true or false")


@dataclass(frozen=True)
class DPConfig:
    """Client-level differential privacy of each site's update (DP-LoRA baseline)."""

    clip: float = _opt(0.0, "clip each site's update to this L2 norm (0 = no DP)",
                       flag="dp_clip")
    noise: float = _opt(0.0, "Gaussian noise multiplier sigma (noise std = sigma * clip)",
                        flag="dp_noise")
    delta: float = _opt(1e-5, "the delta of the reported epsilon", flag="dp_delta")

    def __post_init__(self) -> None:
        _finite(self.clip, "dp_clip", low=0)
        _finite(self.noise, "dp_noise", low=0)
        if bool(self.clip) != bool(self.noise):
            raise ParameterError(f"dp_clip={self.clip!r}, dp_noise={self.noise!r}: DP-LoRA "
                                 "needs both a clipping norm and a noise multiplier > 0")
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise ParameterError(f"dp_delta={self.delta!r} must be in (0, 1)")

    @property
    def enabled(self) -> bool:
        return self.clip > 0


@dataclass(frozen=True)
class EngineConfig:
    """Where the run happens and where it writes."""

    name: str = _opt("local", "local (every site in this process) | flower (a SuperLink and one "
                     "SuperNode per site as processes on loopback, gRPC)", flag="engine",
                     choices=("local", "flower"))
    out: str = _opt("runs/demo", "output directory", flag="out")
    min_clients: int = _opt(0, "engine=flower: fewest valid updates a round needs (0 = a "
                            "majority of the sites; threshold keys: at least the threshold)",
                            flag="min_clients")
    round_timeout: float = _opt(600.0, "engine=flower: seconds to wait for the replies of one "
                                "step of a round", flag="round_timeout")

    def __post_init__(self) -> None:
        _check_choices(self)
        if not isinstance(self.out, str) or not self.out:
            raise ParameterError(f"out={self.out!r} must be a directory path")
        if not is_int(self.min_clients) \
                or self.min_clients < 0:
            raise ParameterError(f"min_clients={self.min_clients!r} must be an int >= 0")
        _finite(self.round_timeout, "round_timeout", low=0, low_open=True)


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "training": TrainingConfig,
    "pruning": PruningConfig, "he": HEConfig, "keys": KeysConfig, "dp": DPConfig,
    "engine": EngineConfig,
}


def _flag_name(section_type: type, f) -> str:
    section = next(name for name, t in SECTIONS.items() if t is section_type)
    return f.metadata.get("flag", f"{section}_{f.name}")


@dataclass(frozen=True)
class Option:
    """One setting as the CLI and flat configs see it: its flag and where it lives."""

    flag: str          # e.g. "lora_r" (the CLI flag is --lora-r)
    section: str       # e.g. "lora"
    name: str          # e.g. "r"
    default: Any
    help: str
    choices: tuple | None
    metavar: str | None


def options() -> Iterator[Option]:
    """Every setting of every section, in section order."""
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            yield Option(flag=_flag_name(cls, f), section=section, name=f.name,
                         default=f.default if f.default is not MISSING else None,
                         help=f.metadata.get("help", ""), choices=f.metadata.get("choices"),
                         metavar=f.metadata.get("metavar"))


def _options_by_flag() -> dict[str, Option]:
    return {o.flag: o for o in options()}


def _dropouts_message(sites: int, threshold: int, dropouts: int) -> str:
    """Why K dropouts do not fit, and the --threshold that would let them (if any does)."""
    needed = threshold or sites
    most = sites - dropouts   # the largest threshold that survives K dropouts
    if most > sites / 2:
        fix = (f"pass --threshold {most} (any {most} of {sites} sites decrypt, so {dropouts} "
               f"may drop out)")
    elif sites >= 3:
        fix = (f"a threshold must be more than half of the {sites} sites, so at most "
               f"{(sites - 1) // 2} of them may ever drop out")
    else:
        fix = f"a threshold must be more than half of the {sites} sites, so none may drop out"
    given = (f"the default threshold (0) needs all {sites} sites to decrypt" if not threshold
             else f"--threshold {threshold} needs {needed} of {sites} sites to decrypt")
    return (f"dropouts={dropouts} needs --threshold T with T <= {sites} - {dropouts}: {given}, "
            f"so {sites - needed} may drop out; {fix}")


# Statistical security of flooding when flood_bits=-1 and keys=threshold.
AUTO_FLOOD_BITS = 30

# Flat keys of earlier versions that have no one-to-one successor.
RETIRED = {
    "eval_examples": "each site now holds out a fraction of its own data: set "
                     "data.eval_fraction (flag --eval-fraction) instead",
}


@dataclass(frozen=True)
class RunConfig:
    """What `fedshield run` does. The defaults are the embedded demo (minutes on 2 cores)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    he: HEConfig = field(default_factory=HEConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ParameterError(f"RunConfig.{name} must be a {cls.__name__}, got "
                                     f"{type(getattr(self, name)).__name__}")
        sites, keys = self.n_sites, self.keys
        if keys.mode == "threshold":
            if not self.he.enabled:
                raise ParameterError("keys='threshold' needs HE on (drop --no-he)")
            if sites < 2:
                raise ParameterError(f"keys='threshold' with clients={sites}: an aggregate of "
                                     "one site is that site's update; use at least 2 sites")
            if keys.threshold and not sites / 2 < keys.threshold <= sites:
                raise ParameterError(f"threshold={keys.threshold} must be more than half "
                                     f"the number of sites and at most the number of sites "
                                     f"({sites}): in ({sites / 2:g}, {sites}], or 0 for all")
            needed = keys.threshold or sites
            if keys.dropouts > sites - needed:
                raise ParameterError(_dropouts_message(sites, keys.threshold, keys.dropouts))
        elif keys.threshold or keys.dropouts:
            raise ParameterError(f"threshold={keys.threshold}, dropouts={keys.dropouts} apply "
                                 "to keys='threshold' only")
        if self.dp.enabled and self.training.algorithm == "paper":
            raise ParameterError("DP-LoRA clips and noises updates; algorithm='paper' sends "
                                 "weights. Use --algorithm delta or ffa with --dp-clip")
        if self.engine.min_clients > sites:
            raise ParameterError(f"min_clients={self.engine.min_clients} must be in "
                                 f"[0, {sites}] (the number of sites)")
        if self.engine.name == "flower":
            if not self.he.enabled:
                raise ParameterError("engine='flower' runs encrypted aggregation only; "
                                     "drop --no-he (or use --engine local)")
            if keys.dropouts:
                raise ParameterError(f"dropouts={keys.dropouts} simulates absent parties in "
                                     "the local engine; on Flower, stop a SuperNode instead")
        pruning, rounds = self.pruning, self.training.rounds
        if pruning.mode != "off" and not pruning.t_end and pruning.t_start > rounds:
            raise ParameterError(f"prune_t_start={pruning.t_start} is after the run's last "
                                 f"round (rounds={rounds}), where prune_t_end=0 puts the "
                                 f"target; give --prune-t-start {rounds} or less, or an "
                                 "explicit --prune-t-end")
        if not self.data.site_data and self.data.path == "synthetic" \
                and self.data.examples_per_client < 2:
            raise ParameterError(f"examples_per_client={self.data.examples_per_client}: each "
                                 "site needs at least one training and one held-out example")

    @property
    def n_sites(self) -> int:
        return self.data.n_sites

    @property
    def prune_t_end(self) -> int:
        """The round where the pruning schedule reaches its target (prune_t_end=0: the last)."""
        return self.pruning.t_end or self.training.rounds

    def ckks_params(self) -> CKKSParams:
        """The CKKS parameters of the run (every engine generates its keys with these): the
        profile for the tolerance (CKKSParams.for_precision), with any explicit ring_dim or
        scale_bits on top."""
        threshold = self.keys.mode == "threshold"
        # Threshold partial decryptions leave their parties: flood them by default (IND-CPA^D).
        flood_bits = self.he.flood_bits if self.he.flood_bits >= 0 else (
            AUTO_FLOOD_BITS if threshold else 0)
        # max_weight=0: the Server sends each round's weight bound (within 2x of its largest
        # weight), so no bound for unknown weights needs to be paid for in bytes.
        params = CKKSParams.for_precision(self.he.tolerance, keys=self.keys.mode,
                                          n_parties=self.n_sites, flood_bits=flood_bits,
                                          flood_log_queries=self.he.decryption_budget,
                                          max_weight=0)
        explicit = {k: v for k, v in (("ring_dim", self.he.ring_dim),
                                      ("scale_bits", self.he.scale_bits)) if v}
        return dc_replace(params, flood_log_queries=self.he.decryption_budget, **explicit)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["data"]["site_data"] = list(self.data.site_data)
        return out

    # -- building from dicts, files and flags -------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping, source: str = "config") -> "RunConfig":
        """From sections ({"training": {"rounds": 2}, ...}) or a flat dict of flag names
        ({"rounds": 2}, the format of earlier versions); unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise ParameterError(f"{source} must hold an object (a table), got "
                                 f"{type(data).__name__}")
        if any(isinstance(v, Mapping) for v in data.values()):
            return cls.from_sections(data, source)
        return cls().replace(**dict(data), _source=source)

    @classmethod
    def from_sections(cls, data: Mapping, source: str = "config") -> "RunConfig":
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ParameterError(f"{source}: unknown sections {unknown}; known: {list(SECTIONS)}")
        built = {}
        for name, section_cls in SECTIONS.items():
            values = data.get(name, {})
            if not isinstance(values, Mapping):
                raise ParameterError(f"{source}: section {name!r} must be a table, got "
                                     f"{values!r}")
            known = {f.name for f in fields(section_cls)}
            bad = sorted(set(values) - known)
            if bad:
                raise ParameterError(f"{source}: unknown fields {bad} in section {name!r}; "
                                     f"known: {sorted(known)}")
            built[name] = section_cls(**values)
        return cls(**built)

    def replace(self, _source: str = "settings", **flat) -> "RunConfig":
        """A copy with settings changed by flag name (``rounds=2, lora_r=8``)."""
        by_flag = _options_by_flag()
        changes: dict[str, dict] = {}
        for key, value in flat.items():
            if key in RETIRED:
                raise ParameterError(f"{_source}: {key!r} is no longer a setting: {RETIRED[key]}")
            option = by_flag.get(key)
            if option is None:
                raise ParameterError(f"{_source}: unknown setting {key!r}; known: "
                                     f"{sorted(by_flag)}")
            changes.setdefault(option.section, {})[option.name] = value
        sections = {name: dc_replace(getattr(self, name), **changes[name]) if name in changes
                    else getattr(self, name) for name in SECTIONS}
        return RunConfig(**sections)

    @classmethod
    def from_flat(cls, **flat) -> "RunConfig":
        """The defaults with settings given by flag name: ``RunConfig.from_flat(rounds=2)``."""
        return cls().replace(**flat)

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        """A TOML file (one table per section) or a JSON object (sections, or the flat keys
        of earlier versions)."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ParameterError(f"cannot read config {path}: {exc.strerror or exc}") from exc
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParameterError(f"cannot read config {path}: not UTF-8 text (a TOML or JSON "
                                 f"file was expected): {exc}") from exc
        if path.suffix.lower() == ".toml":
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise ParameterError(f"cannot read config {path}: not valid TOML: {exc}") from exc
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ParameterError(f"cannot read config {path}: not valid JSON ({exc}); TOML "
                                     "files need the .toml suffix") from exc
        try:
            return cls.from_dict(data, source=f"config {path}")
        except TypeError as exc:
            raise ParameterError(f"config {path}: {exc}") from exc
