"""LoRA / QLoRA students through `peft`: adapters trained with the KD losses, merged at the end.

`apply_lora` freezes the student and adds rank-r adapters to the named linear layers; the loop
then optimises (and checkpoints the optimizer state of) the adapters only. `merge_lora` folds them
into the weights, so the saved student is a plain Hugging Face model with no peft dependency.
QLoRA (`load_in_4bit`) keeps the frozen base weights in 4-bit NF4: it needs bitsandbytes and a GPU.
"""

from __future__ import annotations

import importlib.util

import torch

from kdkit.errors import UserError


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("student.lora needs the `peft` package: `pip install peft`") from None
    return peft


def check_4bit() -> None:
    """QLoRA's requirements, as one error a user can act on."""
    missing = [what for what, ok in (("bitsandbytes", importlib.util.find_spec("bitsandbytes") is not None),
                                     ("a CUDA GPU", torch.cuda.is_available())) if not ok]
    if missing:
        raise UserError(f"student.lora.load_in_4bit needs {' and '.join(missing)}; set student.lora.load_in_4bit="
                        "false to train LoRA adapters on full-precision weights")


def quantization_config():
    """The NF4 config QLoRA loads the student's base weights with."""
    check_4bit()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def quantize_4bit(student) -> torch.nn.Module:
    """The student reloaded with NF4 base weights on this process's GPU (QLoRA)."""
    import os
    import tempfile

    from transformers import AutoModelForCausalLM

    qc = quantization_config()
    with tempfile.TemporaryDirectory() as tmp:
        student.save_pretrained(tmp)
        device = int(os.environ.get("LOCAL_RANK", "0"))
        return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=qc, device_map={"": device})


def apply_lora(student, lora) -> torch.nn.Module:
    """The student with adapters (only they require grad); `lora` is a LoraConfig section."""
    peft = _peft()
    if lora.load_in_4bit:
        student = peft.prepare_model_for_kbit_training(quantize_4bit(student), use_gradient_checkpointing=False)
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM")
    try:
        model = peft.get_peft_model(student, config)
    except ValueError as e:  # e.g. target modules that the model does not have
        raise UserError(f"student.lora: {e}") from None
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"student.lora.target_modules={lora.target_modules!r} matched no layer of the student")
    return model


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def merge_lora(model) -> torch.nn.Module:
    """A plain model with the adapters folded into its weights (W + scale·B·A)."""
    if not is_lora(model):
        return model
    return model.merge_and_unload()


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
