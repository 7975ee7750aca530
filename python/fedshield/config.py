"""Run configuration: one dataclass, every field defaulted and validated."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .datasets import parse_columns
from .errors import ParameterError

_CHOICES = {
    "keys": ("shared", "threshold"),
    "prune": ("local", "global", "off"),
    "algorithm": ("delta", "paper", "ffa"),
    "engine": ("local", "flower"),
    "split": ("auto", "tasks", "iid", "dirichlet"),
    "dtype": ("fp32", "bf16"),
    "quantize": ("none", "8bit", "4bit"),
    "device": ("auto", "cpu", "cuda"),
    "template": ("auto", "alpaca", "compact"),
}


@dataclass(frozen=True)
class RunConfig:
    """What `fedshield run` does. The defaults are the embedded demo (minutes on 2 cores)."""

    clients: int = field(default=3, metadata={"help": "number of simulated clients"})
    rounds: int = field(default=4, metadata={"help": "federated rounds"})
    model: str = field(default="tiny", metadata={"help": "'tiny' (built from a config) or a local path"})
    data: str = field(default="synthetic", metadata={"help": "'synthetic' (generated) or a local path"})
    columns: str = field(default="", metadata={
        "help": "--data file: FIELD=COLUMN pairs naming its columns, e.g. "
                "'instruction=question,output=answer' (fields: instruction, input, output, task)"})
    split: str = field(default="auto", metadata={
        "help": "client split: tasks (each client mostly one task; needs a task field), iid, "
                "dirichlet (Dirichlet(alpha) over the task field, else hashed instructions); "
                "auto = tasks for synthetic data, iid for a file"})
    dirichlet_alpha: float = field(default=0.5, metadata={
        "help": "split=dirichlet: concentration (small = more skewed)"})
    dtype: str = field(default="fp32", metadata={"help": "base model weights: fp32 | bf16"})
    lora_targets: str = field(default="", metadata={
        "help": "comma-separated LoRA target modules (empty = per architecture: "
                "q_proj,v_proj for llama/mistral/qwen2, c_attn for gpt2)"})
    he: bool = field(default=True, metadata={"help": "encrypt updates with CKKS (False: plaintext FedAvg)"})
    keys: str = field(default="shared", metadata={
        "help": "shared: one key on every client (paper mode, weaker); threshold: each client "
                "holds a key share, decryption needs partial decryptions"})
    threshold: int = field(default=0, metadata={
        "help": "threshold mode: shares needed to decrypt (0 = every client; t > clients/2)"})
    dropouts: int = field(default=0, metadata={
        "help": "threshold mode: clients (ids 0..k-1, the lead included) absent at decryption"})
    prune: str = field(default="local", metadata={"help": "local | global | off"})
    algorithm: str = field(default="delta", metadata={
        "help": "delta: weighted FedAvg of updates; paper: unweighted average of pruned weights "
                "replaces the global state; ffa: FFA-LoRA, A frozen from the shared seed, only B "
                "trained and sent (exact aggregation, half the payload)"})
    engine: str = field(default="local", metadata={
        "help": "local (in-process simulation) | flower (a SuperLink and one SuperNode per "
                "client as processes on loopback, gRPC)"})
    out: str = field(default="runs/demo", metadata={"help": "output directory"})
    seed: int = field(default=0, metadata={"help": "seed of data, model, LoRA init and training"})
    examples_per_client: int = field(default=96, metadata={"help": "synthetic examples per client"})
    eval_examples: int = field(default=64, metadata={
        "help": "held-out examples (for a --data file: the last ones after a seeded shuffle)"})
    local_steps: int = field(default=50, metadata={"help": "optimizer steps per client per round"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    max_len: int = field(default=96, metadata={"help": "tokens per example"})
    lr: float = field(default=1e-2, metadata={"help": "peak learning rate (cosine-decayed over rounds)"})
    lr_min: float = field(default=1e-3, metadata={"help": "final learning rate"})
    lora_r: int = field(default=32, metadata={"help": "LoRA rank (the paper's 32)"})
    lora_alpha: float = field(default=64.0, metadata={"help": "LoRA alpha (the paper's 64)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    prune_p0: float = field(default=0.2, metadata={"help": "pruned fraction at t_start"})
    prune_target: float = field(default=0.5, metadata={"help": "pruned fraction from t_end on"})
    prune_t_start: int = field(default=1, metadata={"help": "round where the schedule starts"})
    prune_t_end: int = field(default=4, metadata={"help": "round where p_target is reached"})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass (less memory, more compute)"})
    quantize: str = field(default="none", metadata={
        "help": "load --model in 8bit or 4bit (bitsandbytes on a CUDA GPU; QLoRA-style)"})
    device: str = field(default="auto", metadata={
        "help": "where the model trains: auto (cuda when available), cpu, cuda"})
    template: str = field(default="auto", metadata={
        "help": "prompt template: alpaca, compact (alpaca without its preamble sentence), "
                "auto = compact for the tiny model, alpaca otherwise"})
    dp_clip: float = field(default=0.0, metadata={
        "help": "DP-LoRA: clip each client's update to this L2 norm (0 = no DP)"})
    dp_noise: float = field(default=0.0, metadata={
        "help": "DP-LoRA: Gaussian noise multiplier sigma (noise std = sigma * dp_clip)"})
    dp_delta: float = field(default=1e-5, metadata={"help": "DP-LoRA: the delta of the reported epsilon"})
    samples: int = field(default=2, metadata={
        "help": "held-out prompts answered by the global model after every round (0 = none)"})
    sample_tokens: int = field(default=32, metadata={"help": "tokens generated per sample"})
    ring_dim: int = field(default=16384, metadata={"help": "CKKS ring dimension"})
    flood_bits: int = field(default=-1, metadata={
        "help": "noise flooding of every decryption at this statistical security level in bits "
                "(IND-CPA^D protection, ~2.7x the bytes: 3 RNS towers); 0 = off; -1 = auto: 30 "
                "with threshold keys, whose partial decryptions leave the parties, off with "
                "shared keys, whose decryptions stay with the key holders"})
    scale_bits: int = field(default=0, metadata={
        "help": "CKKS scale bits (0 = 50 with shared keys, 52 with threshold keys)"})
    min_clients: int = field(default=0, metadata={
        "help": "engine=flower: fewest valid updates a round needs (0 = a majority of the "
                "clients; threshold mode: at least the threshold)"})
    round_timeout: float = field(default=600.0, metadata={
        "help": "engine=flower: seconds to wait for the replies of one step of a round"})

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ParameterError(f"{name}={getattr(self, name)!r} is not one of {choices}")
        positive = ("clients", "rounds", "examples_per_client", "eval_examples", "local_steps",
                    "batch_size", "grad_accum", "max_len", "lora_r")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParameterError(f"{name}={value!r} must be a positive int")
        if not (self.lr > 0 and 0 <= self.lr_min <= self.lr):
            raise ParameterError(f"lr={self.lr!r}, lr_min={self.lr_min!r}: need 0 <= lr_min <= lr, lr > 0")
        if not (isinstance(self.dirichlet_alpha, (int, float)) and self.dirichlet_alpha > 0
                and math.isfinite(self.dirichlet_alpha)):
            raise ParameterError(f"dirichlet_alpha={self.dirichlet_alpha!r} must be a finite "
                                 "number > 0")
        if not isinstance(self.model, str) or not self.model:
            raise ParameterError(f"model={self.model!r} must be 'tiny' or a local directory")
        if not isinstance(self.data, str) or not self.data:
            raise ParameterError(f"data={self.data!r} must be 'synthetic' or a local file")
        parse_columns(self.columns)
        if self.columns and self.data == "synthetic":
            raise ParameterError(f"columns={self.columns!r} applies to a --data file only")
        if not isinstance(self.lora_targets, str):
            raise ParameterError(f"lora_targets={self.lora_targets!r} must be a string "
                                 "like 'q_proj,v_proj'")
        targets = [t.strip() for t in self.lora_targets.split(",")] if self.lora_targets else []
        if any(not t for t in targets):
            raise ParameterError(f"lora_targets={self.lora_targets!r}: empty module name")
        if not 0 <= self.lora_dropout < 1:
            raise ParameterError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.keys == "threshold":
            if not self.he:
                raise ParameterError("keys='threshold' needs HE on (drop --no-he)")
            if self.clients < 2:
                raise ParameterError(f"keys='threshold' with clients={self.clients}: an aggregate "
                                     "of one client is that client's update; use at least 2")
            if self.threshold and not self.clients / 2 < self.threshold <= self.clients:
                raise ParameterError(f"threshold={self.threshold} must be in "
                                     f"({self.clients / 2:g}, {self.clients}] or 0")
            needed = self.threshold or self.clients
            if not 0 <= self.dropouts <= self.clients - needed:
                raise ParameterError(f"dropouts={self.dropouts}: with {self.clients} clients and "
                                     f"{needed} shares needed, at most {self.clients - needed} "
                                     "may drop out")
        elif self.threshold or self.dropouts:
            raise ParameterError(f"threshold={self.threshold}, dropouts={self.dropouts} apply "
                                 "to keys='threshold' only")
        self._check_dp()
        if not isinstance(self.flood_bits, int) or self.flood_bits < -1:
            raise ParameterError(f"flood_bits={self.flood_bits!r} must be -1 (auto), 0 (off) or "
                                 "a statistical security level in bits")
        if self.flood_bits > 0 and not self.he:
            raise ParameterError(f"flood_bits={self.flood_bits} floods decryptions; it needs HE "
                                 "on (drop --no-he)")
        for name in ("samples", "sample_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ParameterError(f"{name}={value!r} must be an int >= 0")
        if self.quantize != "none" and self.model == "tiny":
            raise ParameterError(f"quantize={self.quantize!r} applies to a --model directory, "
                                 "not the tiny demo model")
        if self.quantize != "none" and self.device == "cpu":
            raise ParameterError(f"quantize={self.quantize!r} needs a CUDA GPU; device='cpu' "
                                 "was asked for")
        if not (isinstance(self.min_clients, int) and 0 <= self.min_clients <= self.clients):
            raise ParameterError(f"min_clients={self.min_clients!r} must be in [0, clients]")
        if not (isinstance(self.round_timeout, (int, float)) and self.round_timeout > 0
                and math.isfinite(self.round_timeout)):
            raise ParameterError(f"round_timeout={self.round_timeout!r} must be a positive "
                                 "number of seconds")
        if self.engine == "flower":
            if not self.he:
                raise ParameterError("engine='flower' runs encrypted aggregation only; "
                                     "drop --no-he (or use --engine local)")
            if self.dropouts:
                raise ParameterError(f"dropouts={self.dropouts} simulates absent parties in "
                                     "the local engine; on Flower, stop a SuperNode instead")
        if self.examples_per_client < self.batch_size:
            raise ParameterError(f"examples_per_client={self.examples_per_client} is smaller "
                                 f"than batch_size={self.batch_size}")

    def _check_dp(self) -> None:
        for name in ("dp_clip", "dp_noise"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ParameterError(f"{name}={value!r} must be a finite number >= 0")
        if bool(self.dp_clip) != bool(self.dp_noise):
            raise ParameterError(f"dp_clip={self.dp_clip!r}, dp_noise={self.dp_noise!r}: DP-LoRA "
                                 "needs both a clipping norm and a noise multiplier > 0")
        if not (isinstance(self.dp_delta, (int, float)) and 0 < self.dp_delta < 1):
            raise ParameterError(f"dp_delta={self.dp_delta!r} must be in (0, 1)")
        if self.dp_clip and self.algorithm == "paper":
            raise ParameterError("DP-LoRA clips and noises updates; algorithm='paper' sends "
                                 "weights. Use --algorithm delta or ffa with --dp-clip")

    @property
    def dp(self) -> bool:
        return self.dp_clip > 0

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "RunConfig":
        return RunConfig(**{**self.to_dict(), **changes})

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        """A JSON object of RunConfig fields; unknown keys are an error."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ParameterError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ParameterError(f"config {path} must hold a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ParameterError(f"config {path}: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)
