"""What the study measures, one module per measurement kind.

Every kind module has the same small surface, which is all the study dispatches to:
- `SETTINGS`: the protocol settings (attributes of the study's settings) that identify one of its results;
- `check(settings, presses)`: every check that needs no model weights;
- `measure(model, tokenizer, windows, presses, settings, log)`: yields `(label, result)` for the presses
  (label -> Press) as their results are complete; a result is a JSON-able dict.
"""

from kvlib.measure import latency, ppl

KINDS = {"ppl": ppl, "latency": latency}

__all__ = ["KINDS", "latency", "ppl"]
