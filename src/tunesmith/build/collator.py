"""Building the default collator (padding-free, padded or vision); it has no side effect on the model."""

from __future__ import annotations

import logging

from tunesmith.config import SFTConfig

logger = logging.getLogger("tunesmith.trainer")


# Padding-free batches on the CPU are padded to a multiple of this many tokens (see
# PaddingFreeCollator): a bounded set of shapes for oneDNN's per-shape kernel caches.
CPU_PAD_TO_MULTIPLE_OF = 64


def build_collator(tokenizer, args: SFTConfig):
    """Padding-free (exact, only faster) unless `padding_free=False`; padding-free batches get
    per-document attention (set on the model by `build.model.set_batch_attention`) so that flattened or
    packed documents never see each other."""
    from tunesmith.data.collate import PaddedCollator, PaddingFreeCollator
    from tunesmith.data.vision import VisionCollator, is_processor

    if is_processor(tokenizer):
        # the processor pads and batches the pixel tensors as the family's model expects
        return VisionCollator(tokenizer, args.pad_to_multiple_of)
    if args.padding_free is False:
        if args.packing:
            logger.warning(
                "packing with padding_free=False: the documents of a packed row attend to each other "
                "(one attention mask per row); leave padding_free unset to keep them apart"
            )
        return PaddedCollator(tokenizer.pad_token_id, args.pad_to_multiple_of)
    multiple = args.pad_to_multiple_of
    if multiple is None and args.device.type == "cpu":
        multiple = CPU_PAD_TO_MULTIPLE_OF
    return PaddingFreeCollator(getattr(tokenizer, "pad_token_id", None), multiple)


class WithExampleIndex:
    """Wraps a collator: takes `example_index` out of each row and puts the list on the batch."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        if features and isinstance(features[0], dict) and "example_index" in features[0]:
            features = [dict(f) for f in features]
            indices = [f.pop("example_index") for f in features]
            batch = self.collator(features)
            batch["example_index"] = indices
            return batch
        return self.collator(features)
