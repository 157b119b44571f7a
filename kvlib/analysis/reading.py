"""One-shot against chunked prefill at equal budget: does compressing while reading cost or gain quality?

Reads the metrics table: a press measured both with the default one-shot prefill and with `prefill_chunk` set (same
ratio, precision and positions) gives one comparison row, each side's Δ perplexity against the float baseline with
its 95% paired-bootstrap interval. The verdict follows the rest of the report: one reading is better only where
the two intervals do not overlap.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

KEYS = ["model", "dataset", "method", "compression_ratio", "kv_quant", "positions"]
COLUMNS = [*KEYS, "prefill_chunk", "one_shot_delta", "one_shot_low", "one_shot_high", "chunked_delta", "chunked_low",
           "chunked_high", "difference", "verdict"]  # fmt: skip


def _verdict(chunked: pd.Series, one_shot: pd.Series) -> str:
    if chunked["ppl_delta_ci_high"] < one_shot["ppl_delta_ci_low"]:
        return "chunked better"
    if chunked["ppl_delta_ci_low"] > one_shot["ppl_delta_ci_high"]:
        return "chunked worse"
    return "not separated"


def comparison(table: pd.DataFrame) -> pd.DataFrame:
    """One row per press read both ways (see the module's docstring); empty when no chunked row exists."""
    needed = {"prefill_chunk", "ppl_delta", "ppl_delta_ci_low", "ppl_delta_ci_high"}
    if table.empty or not needed <= set(table.columns):
        return pd.DataFrame(columns=COLUMNS)
    rows = table[(table["method"] != "none") & table["ppl_delta"].notna()].copy()
    rows["kv_quant"] = rows["kv_quant"].fillna("none") if "kv_quant" in rows else "none"
    rows["positions"] = rows["positions"].fillna("original") if "positions" in rows else "original"
    plain = rows["kv_budget"].isna() if "kv_budget" in rows else pd.Series(True, index=rows.index)
    one_shot = rows[rows["prefill_chunk"].isna() & plain]
    chunked = rows[rows["prefill_chunk"].notna() & plain]
    merged = chunked.merge(one_shot, on=KEYS, suffixes=("", "_one_shot"))
    out = []
    for _, row in merged.iterrows():
        base = pd.Series({name: row[f"{name}_one_shot"] for name in ("ppl_delta_ci_low", "ppl_delta_ci_high")})
        out.append(
            {
                **{key: row[key] for key in KEYS},
                "prefill_chunk": int(row["prefill_chunk"]),
                "one_shot_delta": row["ppl_delta_one_shot"],
                "one_shot_low": row["ppl_delta_ci_low_one_shot"],
                "one_shot_high": row["ppl_delta_ci_high_one_shot"],
                "chunked_delta": row["ppl_delta"],
                "chunked_low": row["ppl_delta_ci_low"],
                "chunked_high": row["ppl_delta_ci_high"],
                "difference": row["ppl_delta"] - row["ppl_delta_one_shot"],
                "verdict": _verdict(row, base),
            }
        )
    return pd.DataFrame(out, columns=COLUMNS)


def observations(compared: pd.DataFrame) -> list[str]:
    lines = []
    for (model, dataset, chunk), group in compared.groupby(["model", "dataset", "prefill_chunk"], sort=False):
        counts = group["verdict"].value_counts()
        median = float(np.median(group["difference"]))
        lines.append(
            f"{model} on {dataset}, chunks of {chunk}: of {len(group)} press × ratio pairs, chunked prefill is better "
            f"for {counts.get('chunked better', 0)}, worse for {counts.get('chunked worse', 0)}, not separated for "
            f"{counts.get('not separated', 0)}; median Δppl difference (chunked − one-shot) {median:+.2f}."
        )
    return lines


def section(table: pd.DataFrame):
    """The report's section, displayed; nothing when no press was read both ways."""
    from IPython.display import Markdown, display

    compared = comparison(table)
    if compared.empty:
        return
    display(Markdown(
        "## One-shot or chunked prefill\n\nThe same press at the same ratio, its prefix read in one forward pass "
        "(pruned once, at the end) or `prefill_chunk` tokens at a time (pruned after every chunk to the budget of "
        "the final length, so the cache never holds more than budget + chunk): Δ perplexity against the baseline "
        "with 95% intervals. *Better* or *worse* only where the intervals do not overlap.\n\n"
        + "\n".join(f"- {line}" for line in observations(compared))
    ))  # fmt: skip
    view = compared.copy()
    for side in ("one_shot", "chunked"):
        view[side.replace("_", "-")] = [
            f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            for d, lo, hi in zip(view[f"{side}_delta"], view[f"{side}_low"], view[f"{side}_high"], strict=True)
        ]
    view["compression_ratio"] = view["compression_ratio"].map(lambda v: f"{v:g}")
    shown = ["dataset", "method", "compression_ratio", "kv_quant", "prefill_chunk", "one-shot", "chunked", "verdict"]
    if view["model"].nunique() > 1:
        shown.insert(0, "model")
    display(view[shown].style.hide(axis="index"))
