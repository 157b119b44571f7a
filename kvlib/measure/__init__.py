"""What the study measures, one module per measurement kind.

Every kind module has the same small surface, which is all the study dispatches to:
- `SETTINGS`: the protocol settings (attributes of the study's settings) that identify one of its results;
- `check(settings, presses)`: every check that needs no model weights;
- `measure(model, tokenizer, windows, policies, settings, log)`: yields `(label, result)` for the cache policies
  (label -> `kvlib.cache.CachePolicy`: a press and how its kept positions are stored) as their results are
  complete; a result is a JSON-able dict.
Optional:
- `min_windows(settings)`: how many token windows of `max_length` it needs (default 1);
- `resolve(settings, trained_context)`: the settings with what the kind derives from the model's config filled in
  (called once the config is read, before any text is read);
- `LENGTHS`: a kind that sweeps the context length declares its default lengths; the study then measures it at
  each length of `settings.lengths` (else these), capped at the model's context, with `max_length` set to that
  length, so each of its results is identified by its own length. Its table: `analysis.tables.kind_table`.
"""

from kvlib.measure import latency, ppl, retrieval, scaling, streaming

KINDS = {"ppl": ppl, "latency": latency, "scaling": scaling, "retrieval": retrieval, "streaming": streaming}

__all__ = ["KINDS", "latency", "ppl", "retrieval", "scaling", "streaming"]
