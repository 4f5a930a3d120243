"""TrainConfig: the training loop's settings, with presets, JSON round-trip and unknown keys rejected."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path, PurePath

from .. import _checks, _files

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps; the learning-rate schedule spans exactly this many
    batch_size: int = 32  # global batch (split across processes under torchrun)
    lr: float = 1e-3  # peak learning rate after warmup
    warmup_steps: int = 100  # linear warmup from 0, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # AdamW; not applied to biases, norms and embeddings
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 100  # steps between evaluations on the valid split; 0 = only at the end
    eval_batches: int = 8  # valid batches per evaluation (each of batch_size rows)
    early_stop_patience: int = 0  # stop after this many evaluations without improvement; 0 = never
    target_loss: float | None = None  # stop once the valid loss is at or below this
    seed: int = 0  # model-independent: dropout and data order follow it
    precision: str = "auto"  # "auto": bf16 autocast on a CUDA device that supports it, else fp32
    gradient_checkpointing: bool = False  # recompute block activations in backward (less memory)
    out_dir: str | None = None  # log.jsonl, checkpoints and configs go here; resumes from its checkpoint
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end and on interruption)
    device: str = "auto"  # "auto": cuda if available, else cpu
    progress: bool = True  # tqdm bar on stderr

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batches"):
            _checks.positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "early_stop_patience", "checkpoint_every", "seed"):
            _checks.non_negative_int(name, getattr(self, name))
        for name in ("lr", "weight_decay", "grad_clip", "min_lr_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0, got 0")
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not isinstance(self.betas, list | tuple) or len(self.betas) != 2 or not all(
                isinstance(b, numbers.Real) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.target_loss is not None and (isinstance(self.target_loss, bool)
                                             or not isinstance(self.target_loss, numbers.Real)):
            raise TypeError(f"target_loss must be a number or None, got {self.target_loss!r}")
        for name in ("gradient_checkpointing", "progress"):  # (a string such as "false" would read as true)
            value = getattr(self, name)
            if not (isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1))):
                raise TypeError(f"{name} must be true or false, got {value!r}")
            setattr(self, name, bool(value))
        if self.out_dir is not None and not isinstance(self.out_dir, str | PurePath):
            raise TypeError(f"out_dir must be a path (a string) or None, got {self.out_dir!r}")
        _checks.one_of("precision", self.precision, PRECISIONS)
        if not isinstance(self.device, str):
            raise TypeError(f"device must be a string such as 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.out_dir is not None:
            self.out_dir = str(self.out_dir)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Build from a dict; unknown keys are rejected, naming the known ones."""
        if not isinstance(data, dict):
            raise TypeError(f"a TrainConfig is built from a dict of its fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig key(s) {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Read a JSON file holding a TrainConfig dict; a bad file is a ValueError naming it and the field."""
        path = Path(path)
        if not path.is_file() and not path.exists():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        data = _files.read_json(path, "a JSON object of TrainConfig fields")
        _files.mapping(path, data, (), "a JSON object of TrainConfig fields")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def preset(cls, name: str, **overrides) -> TrainConfig:
        """The training part of preset ``name`` (see :data:`PRESETS`), with ``overrides`` applied."""
        _checks.one_of("preset", name, tuple(PRESETS))
        return replace(cls.from_dict(PRESETS[name]["train"]), **overrides) if overrides else \
            cls.from_dict(PRESETS[name]["train"])


# A preset names a task, a model and a training budget that belong together (used by `bsbr train --preset`).
PRESETS: dict[str, dict] = {
    "tiny": {  # seconds on a laptop CPU: smoke tests
        "task": {"name": "mqar", "seq_len": 64, "vocab_size": 64, "num_kv_pairs": 4},
        "model": {"name": "BSBR", "hidden_dim": 32, "num_layers": 1, "num_heads": 2, "chunk_size": 16},
        "train": {"steps": 50, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "eval_every": 25, "eval_batches": 2},
    },
    "mqar-small": {  # Zoology-like recall at T = 256 with hidden 128, 2 layers
        "task": {"name": "mqar", "seq_len": 256, "vocab_size": 8192, "num_kv_pairs": 16},
        "model": {"name": "BSBR", "hidden_dim": 128, "num_layers": 2, "num_heads": 4, "chunk_size": 64},
        "train": {"steps": 2000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 100, "eval_every": 200,
                  "eval_batches": 4, "weight_decay": 0.1},
    },
    "lm-small": {  # byte-level language model on the prose corpus at T = 1024
        "task": {"name": "lm", "seq_len": 1024, "corpus": "prose"},
        "model": {"name": "BSBR", "hidden_dim": 128, "num_layers": 2, "num_heads": 4, "chunk_size": 64},
        "train": {"steps": 1000, "batch_size": 16, "lr": 2e-3, "warmup_steps": 50, "eval_every": 100,
                  "eval_batches": 8},
    },
}
