"""Generate text from prompts or chat messages with a training model (adapter or merged)."""

from __future__ import annotations

import torch

__all__ = ["generate", "generate_from_ids", "chat_prompt_ids", "stop_token_ids"]


def generate(
    model,
    tokenizer,
    prompts_or_messages,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    chat_template_kwargs: dict | None = None,
    images=None,
    **kwargs,
) -> list[str]:
    """Continuations (new text only, special tokens removed) for each prompt.

    `prompts_or_messages`: a string, a list of strings, one conversation (a list of
    {"role", "content"} dicts), or a list of conversations. Conversations go through the
    tokenizer's chat template with the generation prompt added (and `chat_template_kwargs`, e.g.
    `{"enable_thinking": False}`, as template variables); strings are tokenized as they are.

        generate(model, tok, ["The capital of France is"], max_new_tokens=3)  -> [" Paris."]
        generate(model, tok, [{"role": "user", "content": "Hi"}])             -> ["Hello!"]

    A vision-language model takes its processor as `tokenizer` and `images`: per prompt a list of
    images (PIL images or paths), placed where the messages hold `{"type": "image"}` parts, or at the
    start of the first user turn when they hold none (as in training).

        generate(vlm, processor, [{"role": "user", "content": "What is it?"}], images=[["cat.png"]])

    Prompts run one at a time (no padding, so the output is exactly what the model gives each
    prompt alone). The model's train/eval mode is restored afterwards.
    """
    items = _as_list(prompts_or_messages)
    processor = tokenizer if hasattr(tokenizer, "image_processor") else None
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if images is not None and processor is None:
        raise ValueError("generate: images need the model's processor (AutoProcessor) as `tokenizer`")
    if images is not None and len(images) != len(items):
        raise ValueError(
            f"generate: {len(items)} prompt(s) but images for {len(images)}; give one list per prompt"
        )
    kwargs.setdefault("eos_token_id", stop_token_ids(model, tokenizer))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for k, item in enumerate(items):
            if processor is not None and not isinstance(item, str) and not torch.is_tensor(item):
                from tunesmith.data.vision import generation_inputs

                inputs = generation_inputs(
                    processor, item, images[k] if images is not None else [], chat_template_kwargs
                )
                inputs = {name: value.to(device) for name, value in inputs.items()}
                with torch.no_grad():
                    generated = model.generate(
                        **inputs,
                        max_new_tokens=max_new_tokens,
                        do_sample=do_sample,
                        pad_token_id=tokenizer.pad_token_id
                        if tokenizer.pad_token_id is not None
                        else tokenizer.eos_token_id,
                        **kwargs,
                    )
                prompt_length = inputs["input_ids"].shape[1]
                outputs.append(tokenizer.decode(generated[0, prompt_length:], skip_special_tokens=True))
                continue
            if isinstance(item, str):
                input_ids = tokenizer(item, return_tensors="pt").input_ids
            elif torch.is_tensor(item):  # token ids, already rendered (generate_from_ids)
                input_ids = item.reshape(1, -1)
            else:
                input_ids = chat_prompt_ids(tokenizer, item, chat_template_kwargs)
            input_ids = input_ids.to(device)
            with torch.no_grad():
                generated = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    pad_token_id=tokenizer.pad_token_id
                    if tokenizer.pad_token_id is not None
                    else tokenizer.eos_token_id,
                    **kwargs,
                )
            outputs.append(tokenizer.decode(generated[0, input_ids.shape[1] :], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


def generate_from_ids(model, tokenizer, prompt_ids, max_new_tokens: int = 128, **kwargs) -> list[str]:
    """`generate` from prompts given as token id lists (rendered already, e.g. the prompt part of a
    prepared eval document), greedy unless `do_sample=True`."""
    return generate(
        model,
        tokenizer,
        [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids],
        max_new_tokens,
        **kwargs,
    )


def chat_prompt_ids(tokenizer, messages, chat_template_kwargs: dict | None = None) -> torch.Tensor:
    """(1, T) token ids of a conversation rendered with the generation prompt, as training renders it
    (the same template variables: with `enable_thinking=False` a Qwen3-style template writes its empty
    `<think></think>` block into the prompt)."""
    from tunesmith.data.templates import check_template_kwargs

    input_ids = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_tensors="pt",
        **check_template_kwargs(chat_template_kwargs),
    )
    if not torch.is_tensor(input_ids):  # newer tokenizers return a BatchEncoding
        input_ids = input_ids["input_ids"]
    return input_ids


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a generation: the model's and tokenizer's eos, and the chat template's
    end-of-turn token (e.g. chatml's <|im_end|>, Llama-3's <|eot_id|>), which fine-tuning trains as
    the last token of every assistant turn but which is often not the model's eos."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id, _end_of_turn_id(tokenizer)):
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return ids


def _end_of_turn_id(tokenizer) -> int | None:
    """The first special token the chat template writes after an assistant message's content."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "xyzzy"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # a template that refuses this conversation: no end-of-turn token to add
        return None
    after = text[text.rfind(marker) + len(marker) :]
    ids = tokenizer(after, add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids)
    return next((i for i in ids if i in special), None)


def _as_list(prompts_or_messages) -> list:
    if isinstance(prompts_or_messages, str):
        return [prompts_or_messages]
    items = list(prompts_or_messages)
    if items and isinstance(items[0], dict):  # one conversation
        return [items]
    return items
