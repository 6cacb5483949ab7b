"""The column contract of every stage, as pyarrow schemas.

Each stage adds columns to its input's; the cumulative schema of a stage's output is what the next stage
may rely on. Names are the users' API (they inspect these tables with polars); indexes are 0-based.
"""

from __future__ import annotations

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

PROMPTS = pa.schema(
    [
        ("prompt_id", pa.string()),  # content hash of (task, problem)
        ("problem", pa.string()),
        ("messages", pa.list_(MESSAGE)),  # the chat prompt when the source has one, else null
        ("answer", pa.string()),
        ("solution", pa.string()),  # reference solution, may be null
        ("data_source", pa.string()),
        ("task", pa.string()),  # which task checks and splits this row
        ("difficulty", pa.int32()),  # task-defined (arith: operand count); null when unknown
        ("extra_info", pa.string()),  # the source's extra_info as JSON, may be null
    ]
)

ROLLOUT_COLUMNS = [
    ("sample_idx", pa.int32()),
    ("prompt_text", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("response", pa.string()),
    ("response_ids", pa.list_(pa.int32())),
    ("response_logprobs", pa.list_(pa.float32())),  # per token, under the sampled distribution
    ("finish_reason", pa.string()),  # stop | length
    # the sampled end-of-sequence token (left out of response_ids; train-step trains on it); null when
    # the row was cut at max_tokens or ended by a stop string, and in runs written before the column
    ("stop_token_id", pa.int32()),
    ("policy", pa.string()),  # the policy folder's name (policy-NNN)
    ("seed", pa.int64()),  # the row's sampling seed
]

VERIFY_COLUMNS = [
    ("pred", pa.string()),  # the extracted answer, null when none
    ("correct", pa.bool_()),
    ("reward", pa.float32()),
    ("verify_status", pa.string()),  # ok | no_answer | timeout | error
]

PRM_COLUMNS = [
    ("steps", pa.list_(pa.string())),
    ("step_token_ends", pa.list_(pa.int32())),  # exclusive token index where each step ends
    ("step_scores", pa.list_(pa.float32())),  # P(step correct); null when the row was not scored
]

LOCATE_COLUMNS = [
    ("first_error_step", pa.int32()),  # 0-based; null: none found
    ("salvage", pa.bool_()),
]

RECTIFY_COLUMNS = [
    # policy | rectified | reference | guided (luffy_matched: the guide's whole solution)
    ("origin", pa.string()),
    ("in_batch", pa.bool_()),  # false for a parent replaced by its rectified row
    ("parent_sample_idx", pa.int32()),
    ("offpolicy_start", pa.int32()),  # token index where guide tokens begin; null for policy rows
    # the two parts of a new row's response as text (null for policy rows): kept_text is
    # decode(response_ids[:offpolicy_start]) (the parent's own kept tokens; "" for reference and guided rows),
    # guide_text the text the guide wrote, which rectify tokenized into response_ids[offpolicy_start:].
    # kept_text + guide_text == response wherever the tokenizer round-trips the guide's text.
    # On new rows `policy` names the guide: "oracle:<task>", the model guide's folder name, or
    # "reference" (luffy); policy rows keep the policy-NNN that sampled them.
    ("kept_text", pa.string()),
    ("guide_text", pa.string()),
]

# columns added after runs were written with the schema: a shard without one reads as nulls (conform)
# rather than failing the column check
OPTIONAL_COLUMNS = frozenset({"stop_token_id"})

ORIGINS = ("policy", "rectified", "reference", "guided")


def _extend(base: pa.Schema, cols: list[tuple[str, pa.DataType]]) -> pa.Schema:
    return pa.schema(list(base) + [pa.field(n, t) for n, t in cols])


ROLLOUTS = _extend(PROMPTS, ROLLOUT_COLUMNS)
VERIFIED = _extend(ROLLOUTS, VERIFY_COLUMNS)
SCORED = _extend(VERIFIED, PRM_COLUMNS)
LOCATED = _extend(SCORED, LOCATE_COLUMNS)
RECTIFIED = _extend(LOCATED, RECTIFY_COLUMNS)

# stage folder -> (schema of its output, the stage that writes it)
STAGE_OUTPUTS: dict[str, tuple[pa.Schema, str]] = {
    "prompts": (PROMPTS, "prepare"),
    "rollouts": (ROLLOUTS, "generate"),
    "verified": (VERIFIED, "verify"),
    "scored": (SCORED, "prm-score"),
    "located": (LOCATED, "locate-error"),
    "rectified": (RECTIFIED, "rectify"),
}

EVAL_SUMMARY = pa.schema(
    [
        ("round", pa.int32()),
        ("policy", pa.string()),
        ("eval_set", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
    ]
)

TRAIN_METRICS = pa.schema(
    [
        ("round", pa.int32()),
        ("update", pa.int32()),  # global optimizer update count after this update
        ("epoch", pa.int32()),
        ("minibatch", pa.int32()),
        ("loss", pa.float64()),
        ("lr", pa.float64()),
        ("onpolicy_tokens", pa.int64()),
        ("offpolicy_tokens", pa.int64()),
        ("mean_ratio", pa.float64()),
        ("clip_fraction", pa.float64()),
        ("mean_offpolicy_prob", pa.float64()),
        ("entropy", pa.float64()),
        ("grad_norm", pa.float64()),
        ("kl", pa.float64()),
        ("dropped_groups", pa.int64()),
    ]
)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Order and cast `table`'s columns to `schema` (columns missing from the table become nulls)."""
    arrays = []
    for fld in schema:
        if fld.name in table.column_names:
            col = table.column(fld.name)
            arrays.append(col if col.type == fld.type else col.cast(fld.type))
        else:
            arrays.append(pa.nulls(table.num_rows, fld.type))
    return pa.Table.from_arrays(arrays, schema=schema)

# eval's per-sample tables (round-R/eval/<set>-greedy.parquet, <set>-sampled.parquet)
EVAL_SAMPLES = pa.schema([
    ("eval_set", pa.string()),
    ("mode", pa.string()),  # greedy | sampled
    ("prompt_id", pa.string()),
    ("sample_idx", pa.int32()),
    ("task", pa.string()),
    ("difficulty", pa.int32()),
    ("problem", pa.string()),
    ("answer", pa.string()),
    ("response", pa.string()),
    ("response_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("pred", pa.string()),
    ("correct", pa.bool_()),
    ("verify_status", pa.string()),
    ("first_error_step", pa.int32()),  # 0-based; null: every step right, or no exact checker
    ("canonical_solution", pa.string()),
    ("policy", pa.string()),
    ("seed", pa.int64()),
])
