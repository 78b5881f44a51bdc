"""LoRA / QLoRA adapters through PEFT, and the optimizer's parameter groups.

Precision under LoRA: the frozen base weights stay in the dtype they were loaded in (bf16 on
hardware that runs it fast); nothing upcasts them to fp32, which would double their memory and
make every matmul slower. The weights the optimizer updates are kept in fp32: the LoRA A/B
matrices (PEFT's `autocast_adapter_dtype`) and the `modules_to_save` copies (`_fp32_trained_copies`),
because an AdamW update of lr * ~1 = 5e-5 on a weight of size ~0.03 is below half a bf16 ulp
(2^-9 relative), so in bf16 most updates would round away. LoRA matrices are small
(r * (in + out) per layer), so fp32 costs little; under bf16 autocast their matmuls run in bf16.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch import nn

from tunesmith.models.introspect import unwrap

logger = logging.getLogger(__name__)

# Names that mean the input embeddings or the LM head in the architectures transformers ships;
# Unsloth scripts put them in target_modules or modules_to_save to train them.
EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def _is_kbit(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_kbit_model(model):
    """Make a 4-bit / 8-bit (bitsandbytes) model ready for adapters, the lean way: freeze every base
    weight and leave dtypes alone.

    PEFT's `prepare_model_for_kbit_training` also casts every non-quantized weight (embeddings, norms,
    LM head) to fp32 and turns on gradient checkpointing; the first costs memory on the largest
    matrices for no accuracy we can measure in SFT, the second is the trainer's decision
    (`gradient_checkpointing`), not the loader's.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _lora_config(peft_config, **kwargs):
    from peft import LoraConfig, TaskType

    if isinstance(peft_config, LoraConfig):
        return peft_config
    if peft_config is None:
        fields = kwargs
    elif isinstance(peft_config, dict):
        fields = {**kwargs, **peft_config}
    else:
        raise TypeError(
            f"peft_config must be a peft.LoraConfig, a dict of LoraConfig fields or None, not {type(peft_config).__name__}"
        )
    fields.setdefault("task_type", TaskType.CAUSAL_LM)
    if fields.get("lora_alpha") is None:
        # Same scale as r: alpha / r = 1, the usual starting point (Unsloth's examples use alpha = r).
        fields["lora_alpha"] = fields.get("r", 16)
    return LoraConfig(**fields)


def apply_lora(
    model,
    peft_config=None,
    *,
    r=16,
    lora_alpha=None,
    lora_dropout=0.0,
    target_modules="all-linear",
    modules_to_save=None,
    bias="none",
    use_rslora=False,
    init_lora_weights=True,
    vision_tower=False,
    train_projector=False,
    **lora_kwargs,
):
    """Wrap `model` in a PEFT LoRA model.

    peft_config: a `peft.LoraConfig` (used as is), a dict of LoraConfig fields (over the keyword
    defaults) or None (built from the keywords). Default targets ("all-linear"): every nn.Linear in
    the decoder layers, never the LM head. `modules_to_save=["embed_tokens", "lm_head"]` trains full
    copies of those; with tied embeddings the two copies stay tied. lora_alpha None means alpha = r.
    A 4-bit / 8-bit model is prepared with `prepare_kbit_model` first.

    On a vision-language model "all-linear" means the language model's linear layers only (the vision
    tower and projector stay frozen); `vision_tower=True` adds the tower's, `train_projector=True` trains
    the projector in full (`models.vision`).
    """
    from peft import get_peft_model

    config = _lora_config(
        peft_config,
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        bias=bias,
        use_rslora=use_rslora,
        init_lora_weights=init_lora_weights,
        **lora_kwargs,
    )
    _vision_targets(model, config, vision_tower, train_projector)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    saved = set(config.modules_to_save or ())
    if tied and set(EMBEDDING_NAMES) <= saved:
        # Without this PEFT trains two independent copies of one tied matrix.
        config.ensure_weight_tying = True
    if _is_kbit(model):
        prepare_kbit_model(model)
    with peft_deprecations_silenced():
        peft_model = get_peft_model(model, config)
    _fp32_trained_copies(peft_model)
    logger.info(
        "LoRA r=%d alpha=%s on %s%s: %s",
        config.r,
        config.lora_alpha,
        sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules,
        f", training {sorted(saved)} in full" if saved else "",
        trainable_summary(peft_model),
    )
    return peft_model


def _vision_targets(model, config, vision_tower: bool, train_projector: bool) -> None:
    """On a VLM: "all-linear" -> the language model's linear layers (+ the vision tower's), projector saved."""
    from tunesmith.models.vision import is_vision_model, lora_targets, projector_names

    if not is_vision_model(model):
        if vision_tower or train_projector:
            raise ValueError(
                "lora_vision_tower / lora_train_projector apply to vision-language models only; "
                f"{type(model).__name__} has no vision tower"
            )
        return
    if config.target_modules == "all-linear" or config.target_modules == {"all-linear"}:
        config.target_modules = set(lora_targets(model, vision_tower=vision_tower))
    elif vision_tower:
        config.target_modules = set(config.target_modules) | set(lora_targets(model, vision_tower=True))
    if train_projector:
        config.modules_to_save = sorted(set(config.modules_to_save or ()) | set(projector_names(model)))


def _cast_output(dtype):
    def hook(module, args, output):
        return output.to(dtype)

    return hook


def _cast_input_to_weight(module, args):
    return (args[0].to(module.weight.dtype), *args[1:])


def _fp32_trained_copies(peft_model) -> None:
    """Keep the fully trained `modules_to_save` copies of a 16-bit model in fp32 (master weights).

    Why: with bf16 weights most AdamW updates of an embedding (lr 5e-5 on weights ~0.03) are below
    half an ulp and round away. The copies still hand the model 16-bit activations: an embedding's
    output is cast to the model's dtype (forward hook); a linear copy (LM head) casts its input up to
    fp32 (pre-hook), so its logits come out in fp32, as the loss wants them. Tied copies share one
    fp32 tensor.
    """
    from peft.utils.other import ModulesToSaveWrapper

    base = unwrap(peft_model)
    compute_dtype = getattr(base, "dtype", torch.float32)
    if compute_dtype not in (torch.bfloat16, torch.float16):
        return
    upcast: dict[int, nn.Parameter] = {}  # id(old 16-bit weight) -> its fp32 copy, so tied copies stay tied
    for wrapper in peft_model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        for copy in wrapper.modules_to_save.values():
            old = copy.weight
            if id(old) not in upcast:
                upcast[id(old)] = nn.Parameter(old.detach().float(), requires_grad=old.requires_grad)
            copy.weight = upcast[id(old)]
            if isinstance(copy, nn.Linear):
                if copy.bias is not None:
                    copy.bias = nn.Parameter(
                        copy.bias.detach().float(), requires_grad=copy.bias.requires_grad
                    )
                copy.register_forward_pre_hook(_cast_input_to_weight)
            else:
                copy.register_forward_hook(_cast_output(compute_dtype))
    if upcast:
        logger.info("modules_to_save copies kept in fp32 (%d tensors) for exact updates", len(upcast))


# --------------------------------------------------------------------------- parameter groups


def _module_names(root: nn.Module, targets) -> set[str]:
    """Qualified names (in `root`) of the modules in `targets`, found by identity."""
    wanted = {id(m) for m in targets if m is not None}
    return {name for name, module in root.named_modules() if id(module) in wanted}


def _embedding_prefixes(model) -> set[str]:
    """Name fragments that mark input-embedding and LM-head parameters, LoRA and modules_to_save
    copies included (their names extend the module's own: `lm_head.modules_to_save.default.weight`)."""
    base = unwrap(model)
    names = _module_names(base, [base.get_input_embeddings(), base.get_output_embeddings()])
    return {f".{name}." for name in names if name}


def _no_decay_names(model) -> set[str]:
    """Parameters that get no weight decay: biases and the weights of normalization layers (any
    1-d parameter), as transformers' Trainer does."""
    norm_ids = set()
    for module in model.modules():
        kind = type(module).__name__.lower()
        if "norm" in kind:
            norm_ids.update(id(p) for p in module.parameters(recurse=False))
    return {
        name
        for name, param in model.named_parameters()
        if param.ndim < 2 or name.endswith("bias") or id(param) in norm_ids
    }


def parameter_groups(model, *, learning_rate, weight_decay, embedding_learning_rate=None) -> list[dict]:
    """The optimizer's parameter groups for the trainable parameters of `model`.

    - "decay": everything else, at `learning_rate` with `weight_decay`;
    - "no_decay": biases and norm weights, weight decay 0;
    - "embedding" / "embedding_no_decay": input embeddings and LM head (their LoRA and
      modules_to_save copies included) at `embedding_learning_rate`, only when it is given.
      Embeddings keep weight decay, as transformers' Trainer and Unsloth's trainer do.

    Each group has "name", "params", "param_names", "lr", "weight_decay"; empty groups are left out.
    Example (tiny Llama, LoRA on q_proj, modules_to_save=["lm_head"], embedding_learning_rate=5e-5):
        [{"name": "decay", "param_names": [...q_proj.lora_A.default.weight, ...], "lr": 2e-4, ...},
         {"name": "embedding", "param_names": ["base_model.model.lm_head.modules_to_save.default.weight"],
          "lr": 5e-5, ...}]
    """
    embedding_marks = _embedding_prefixes(model) if embedding_learning_rate is not None else set()
    no_decay = _no_decay_names(model)
    groups = {
        "decay": (learning_rate, weight_decay),
        "no_decay": (learning_rate, 0.0),
        "embedding": (embedding_learning_rate, weight_decay),
        "embedding_no_decay": (embedding_learning_rate, 0.0),
    }
    members: dict[str, list[tuple[str, torch.Tensor]]] = {name: [] for name in groups}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        dotted = f".{name}"
        is_embedding = any(mark in dotted for mark in embedding_marks)
        if is_embedding:
            group = "embedding_no_decay" if name in no_decay else "embedding"
        else:
            group = "no_decay" if name in no_decay else "decay"
        members[group].append((name, param))
    result = []
    for group_name, (lr, decay) in groups.items():
        if members[group_name]:
            result.append(
                {
                    "name": group_name,
                    "params": [p for _, p in members[group_name]],
                    "param_names": [n for n, _ in members[group_name]],
                    "lr": lr,
                    "weight_decay": decay,
                }
            )
    return result


# --------------------------------------------------------------------------- summary


def _count(param: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte, so a Params4bit reports half its real size.
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def trainable_summary(model) -> str:
    """'trainable 1.2M / 135.0M (0.9%)': trainable parameters over all (tied weights counted once)."""
    total = trainable = 0
    for param in model.parameters():
        count = _count(param)
        total += count
        trainable += count if param.requires_grad else 0
    share = 100 * trainable / total if total else 0.0
    return f"trainable {_human(trainable)} / {_human(total)} ({share:.1f}%)"


@contextlib.contextmanager
def peft_deprecations_silenced():
    """PEFT (0.21) reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
    FutureWarning on every LoRA model built or loaded; the user can do nothing about it, so exactly that
    warning is silenced while PEFT wraps the model (any other still shows)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield
