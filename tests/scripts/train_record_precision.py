"""`python train_record_precision.py tokenizer|prior <train args>`: run that stage's train script and record
which precision its layers actually ran in. At the end it prints one line

    PRECISION {"linear_or_conv_outputs": [dtypes], "quantizer_calls": n, "quantizer_inputs": [[dtype, autocast]]}

from forward hooks on every Linear / Conv2d of the trained model (the dtypes they produced) and a pre-hook
on the tokenizer's quantizer (the dtype of its input and whether autocast was on inside it), in training
steps only (train mode with gradients: not the quantizer's data init or the validation / sample grids).
"""
import importlib
import json
import sys

import torch

from common.training import Trainer

stage = sys.argv[1]
if stage not in ("tokenizer", "prior"):
    raise SystemExit(f"first argument must be tokenizer or prior, got {stage!r}")
module = importlib.import_module(f"{stage}.train")
builder_name = "build_tokenizer" if stage == "tokenizer" else "build_prior"
original_builder = getattr(module, builder_name)
layer_dtypes: set[str] = set()
quantizer_inputs: set[tuple[str, bool]] = set()
quantizer_calls = 0


def record_layer(layer, inputs, output):
    if layer.training and torch.is_grad_enabled():  # training steps only (not the quantizer init or the grids)
        layer_dtypes.add(str(output.dtype))


def record_quantizer(quantizer, inputs):
    global quantizer_calls
    if quantizer.training and torch.is_grad_enabled():
        quantizer_calls += 1
        quantizer_inputs.add((str(inputs[0].dtype), torch.is_autocast_enabled(inputs[0].device.type)))


def build_and_hook(*args, **kwargs):
    model = original_builder(*args, **kwargs)
    for layer in model.modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            layer.register_forward_hook(record_layer)
    if stage == "tokenizer":
        model.quantizer.register_forward_pre_hook(record_quantizer)
    return model


setattr(module, builder_name, build_and_hook)
original_end = Trainer.end


def report_then_end(trainer):
    trainer.print("PRECISION " + json.dumps({"linear_or_conv_outputs": sorted(layer_dtypes),
                                             "quantizer_calls": quantizer_calls,
                                             "quantizer_inputs": sorted(quantizer_inputs)}))
    original_end(trainer)


Trainer.end = report_then_end
module.main(sys.argv[2:])
