"""The loss is the sum over supervised tokens / supervised tokens of the whole optimizer step.

So 1×8, 2×4 and 8×1 (accumulation × batch) give the same loss and the same gradients, on data
whose examples have very different numbers of supervised tokens, and they equal the plain
token-mean cross-entropy of the eight examples computed here with transformers' own loss.
"""

import math

import pytest
import torch
from transformers import TrainerCallback

from tests.tiny import tiny_model, tiny_tokenizer
from tunesmith import SFTConfig, SFTTrainer

# Completions from 1 to ~30 supervised tokens: a per-micro-batch mean would weigh them very differently.
EIGHT = [
    {"prompt": "What is the capital of France?", "completion": "Paris."},
    {
        "prompt": "Who wrote Hamlet?",
        "completion": "William Shakespeare wrote Hamlet, and he wrote it a long time ago in the old world.",
    },
    {"prompt": "Say yes.", "completion": "Yes"},
    {
        "prompt": "Tell a story.",
        "completion": "The cat and the dog were friends. One day the cat said hello to the dog and the dog said hello to the cat, "
        "and they were good friends for a long time.",
    },
    {"prompt": "What color is the sky?", "completion": "Blue."},
    {"prompt": "Add one plus two.", "completion": "One plus two is three, so the answer is three."},
    {
        "prompt": "Hi",
        "completion": "Hello! How can I help you today? I can answer a question or tell a joke.",
    },
    {"prompt": "Name a fruit.", "completion": "Apple"},
]


# Large initial weights make per-token losses differ widely (a near-uniform random model would give
# every token about ln(256) and hide a wrong weighting).
MODEL = dict(arch="llama", initializer_range=0.5)


class GradientGrab(TrainerCallback):
    """Copies every gradient just before the (single) optimizer step."""

    def __init__(self):
        self.grads = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grad_close(actual, expected, name, rel=1e-4):
    """Largest difference within `rel` of the largest gradient entry (fp32 sums in another order)."""
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    assert diff <= rel * scale + 1e-7, f"{name}: max |diff| {diff:.3g} vs max |grad| {scale:.3g}"


def one_step(tmp_path, accumulation, batch, **overrides):
    grab = GradientGrab()
    args = SFTConfig(
        output_dir=str(tmp_path / f"run-{accumulation}x{batch}"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        logging_steps=1,
        max_grad_norm=0.0,  # no clipping: compare the raw gradients
        report_to="none",
        save_strategy="no",
        dataset_cache_dir=False,
        memory_policy="none",
        **overrides,
    )
    trainer = SFTTrainer(
        model=tiny_model(**MODEL),
        args=args,
        train_dataset=EIGHT,
        processing_class=tiny_tokenizer(),
        callbacks=[grab],
    )
    trainer.train()
    return trainer, trainer.state.log_history[0]["loss"], grab.grads


def reference_loss_and_grads(trainer_dataset):
    """transformers' own cross-entropy, per example, weighted by tokens: Σ sum_i / Σ n_i."""
    model = tiny_model(**MODEL)
    total, count, means = 0.0, 0, []
    for row in trainer_dataset:
        input_ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([row["labels"]])
        n = int((labels[0, 1:] != -100).sum())
        mean = model(input_ids=input_ids, labels=labels).loss  # mean over this example's n tokens
        total = total + mean * n
        count += n
        means.append(mean.item())
    loss = total / count
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.item(), grads, sum(means) / len(means)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accumulation")
    return {shape: one_step(tmp, *shape) for shape in [(1, 8), (2, 4), (8, 1)]}


def test_same_loss_and_gradients_for_1x8_2x4_8x1(runs):
    (_, loss_18, grads_18), (_, loss_24, grads_24), (_, loss_81, grads_81) = (
        runs[(1, 8)],
        runs[(2, 4)],
        runs[(8, 1)],
    )
    assert loss_24 == pytest.approx(loss_18, rel=1e-5) and loss_81 == pytest.approx(loss_18, rel=1e-5)
    assert grads_18.keys() == grads_24.keys() == grads_81.keys() and len(grads_18) > 0
    for name in grads_18:
        assert_grad_close(grads_24[name], grads_18[name], name)
        assert_grad_close(grads_81[name], grads_18[name], name)


def test_loss_and_gradients_equal_the_token_mean_reference(runs):
    trainer, loss, grads = runs[(2, 4)]
    ref_loss, ref_grads, mean_of_means = reference_loss_and_grads(trainer.train_dataset)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    # the data is such that averaging per example would be visibly wrong (so this test can fail)
    assert abs(mean_of_means - ref_loss) > 0.02
    for name, grad in grads.items():
        assert_grad_close(grad, ref_grads[name], name)


def test_padded_batches_give_the_same_step(runs, tmp_path):
    # padding_free=False pads each micro-batch instead of concatenating it: same loss, same gradients
    _, loss, grads = one_step(tmp_path, 2, 4, padding_free=False)
    _, loss_ref, grads_ref = runs[(2, 4)]
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    for name in grads_ref:
        assert_grad_close(grads[name], grads_ref[name], name)


def hf_token_mean_loss(model, dataset) -> float:
    """transformers' own loss (full logits, its softcap, its head) as a token mean over `dataset`."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in dataset:
            labels = torch.tensor([row["labels"]])
            n = int((labels[0, 1:] != -100).sum())
            total += model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item() * n
            count += n
    return total / count


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "phi3"])
def test_fused_loss_equals_transformers_loss_per_architecture(tmp_path, arch):
    # gemma2: final logit soft-capping and tied embeddings; phi3: fused qkv; all through the varlen path
    overrides = {"final_logit_softcapping": 5.0} if arch == "gemma2" else {}
    model = tiny_model(arch, initializer_range=0.5, **overrides)
    args = SFTConfig(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=3,
        report_to="none",
        dataset_cache_dir=False,
        memory_policy="none",
    )
    trainer = SFTTrainer(
        model, args=args, train_dataset=EIGHT, eval_dataset=EIGHT, processing_class=tiny_tokenizer()
    )
    # The reference runs eager attention: transformers before 5.21 gave Gemma-2 sdpa and silently skipped
    # its attention-logit soft-capping there (loss 8.00344 vs eager's 8.00420 on a tiny Gemma-2 at 5.18;
    # 5.24 refuses sdpa for Gemma-2 and picks eager), so eager is the reference on every version.
    reference = tiny_model(arch, initializer_range=0.5, attn_implementation="eager", **overrides)
    expected = hf_token_mean_loss(reference, trainer.eval_dataset)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_peft_modules_to_save_head_is_the_one_used(tmp_path):
    # LoRA with a trained copy of lm_head: the loss must use the copy, not the frozen original
    args = SFTConfig(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=4,
        report_to="none",
        dataset_cache_dir=False,
        memory_policy="none",
        use_peft=True,
        lora_modules_to_save=["lm_head"],
    )
    trainer = SFTTrainer(
        tiny_model("llama", initializer_range=0.5),
        args=args,
        train_dataset=EIGHT,  # required, as in TRL; only evaluated here
        eval_dataset=EIGHT,
        processing_class=tiny_tokenizer(),
    )
    copy = trainer.model.base_model.model.lm_head.modules_to_save["default"]
    with torch.no_grad():
        copy.weight.mul_(2.0)  # now the copy and the original give different losses
    expected = hf_token_mean_loss(trainer.model, trainer.eval_dataset)  # PEFT's own forward uses the copy
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)
    with trainer.model.disable_adapter():
        assert hf_token_mean_loss(trainer.model, trainer.eval_dataset) != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("dft", [False, True])
def test_logits_path_for_sharded_models_equals_the_fused_loss(dft):
    # FSDP / DeepSpeed use logits_loss_sum; it must give what the fused path gives (nll and dft)
    from tunesmith.data.collate import PaddingFreeCollator
    from tunesmith.ops.linear_cross_entropy import linear_cross_entropy
    from tunesmith.trainer import final_hidden_states, lm_head_parameters, logits_loss_sum

    model = tiny_model("gemma2", initializer_range=0.5, final_logit_softcapping=5.0)
    tok = tiny_tokenizer()
    rows = [
        {"input_ids": tok(p + " " + c).input_ids, "labels": tok(p + " " + c).input_ids}
        for p, c in [(e["prompt"], e["completion"]) for e in EIGHT[:3]]
    ]
    batch = PaddingFreeCollator()(rows)
    plain_loss, plain_correct, plain_entropy = logits_loss_sum(model, batch, dft=dft)
    weight, bias = lm_head_parameters(model)
    fused_loss, fused_correct, fused_entropy = linear_cross_entropy(
        final_hidden_states(model, batch),
        weight,
        batch["shift_labels"],
        bias=bias,
        softcap=5.0,
        dft=dft,
        return_entropy=True,
    )
    assert plain_loss.item() == pytest.approx(fused_loss.item(), rel=1e-5)
    assert int(plain_correct) == int(fused_correct)
    assert plain_entropy.item() == pytest.approx(fused_entropy.item(), rel=1e-5)


def hf_token_mean_entropy(model, dataset) -> float:
    """Mean entropy of softmax(full logits) at the positions whose next token is trained, over `dataset`:
    the reference for the `entropy` the fused loss logs without building those logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in dataset:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].double()  # (T-1, V)
            trained = torch.tensor(row["labels"][1:]) != -100
            log_p = torch.log_softmax(logits[trained], dim=-1)
            total += float(-(log_p.exp() * log_p).sum())
            count += int(trained.sum())
    return total / count


def test_entropy_is_logged_in_training_and_evaluation_as_the_full_logits_give_it(tmp_path):
    args = SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=3,
        max_steps=1,
        logging_steps=1,
        learning_rate=0.0,  # the weights stay, so the logged training entropy is the reference's too
        report_to="none",
        save_strategy="no",
        dataset_cache_dir=False,
        memory_policy="none",
    )
    model = tiny_model("llama", initializer_range=0.5)
    trainer = SFTTrainer(
        model, args=args, train_dataset=EIGHT, eval_dataset=EIGHT, processing_class=tiny_tokenizer()
    )
    expected = hf_token_mean_entropy(tiny_model("llama", initializer_range=0.5), trainer.eval_dataset)
    assert 0.5 < expected < math.log(256)  # a real distribution, neither peaked nor uniform
    assert trainer.evaluate()["eval_entropy"] == pytest.approx(expected, rel=1e-5)
    trainer.train()
    logged = next(e for e in trainer.state.log_history if "loss" in e)
    assert logged["entropy"] == pytest.approx(expected, rel=1e-5)  # one step over all eight rows


def test_log_entropy_false_logs_no_entropy_and_the_same_loss(tmp_path):
    def run(log_entropy):
        args = SFTConfig(
            output_dir=str(tmp_path / str(log_entropy)),
            per_device_eval_batch_size=3,
            report_to="none",
            dataset_cache_dir=False,
            memory_policy="none",
            log_entropy=log_entropy,
        )
        model = tiny_model("llama", initializer_range=0.5)
        trainer = SFTTrainer(
            model, args=args, train_dataset=EIGHT, eval_dataset=EIGHT, processing_class=tiny_tokenizer()
        )
        return trainer.evaluate()

    with_entropy, without = run(True), run(False)
    assert "eval_entropy" in with_entropy and "eval_entropy" not in without
    assert without["eval_loss"] == with_entropy["eval_loss"]
