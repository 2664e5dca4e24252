"""Stage `distill`: the teacher's next-token distribution on the response tokens of the alignment
examples the finetune draws (`refjax.stages.alignment_rows`), computed once per run and kept as its
top k (+ the mass of the rest) for every distilling method; the student's step then reads targets
instead of running the teacher, and the teacher is not in memory while students train.

Reads teacher/model, the alignment set and the user data (how many rows the finetune draws);
writes distill/targets.npz and distill/summary.json.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from refjax.data.prompts import Encoded, bucket_length, pad_batch
from refjax.files import read_npz, write_json, write_npz
from refjax.method.losses import topk_targets
from refjax.method.student import METHODS, parse_methods
from refjax.stages.alignment_rows import drawn_alignment
from refjax.stages.context import Run

log = logging.getLogger(__name__)
BATCH = 8  # rows per teacher forward (padded to a length bucket)


def needed(cfg: Any) -> bool:
  """Cached targets serve every distilling method unless exact KD (kd_topk = 0) is asked for."""
  return int(cfg.finetune.kd_topk) > 0 and any(
      METHODS[m].weights(cfg.finetune)["kd"] for m in parse_methods(cfg.method))


@functools.partial(jax.jit, static_argnames=("graphdef", "k", "temperature"))
def _targets(graphdef, state, tokens, mask, *, k: int, temperature: float):
  logits = nnx.merge(graphdef, state)(tokens, mask).logits
  return topk_targets(logits, k, temperature)


def run(r: Run) -> dict:
  if not needed(r.cfg):
    write_npz(r.wd.distill_targets, example_ids=np.array([], str))
    return {"skipped": "no method distils from cached targets (finetune.kd_topk = 0 or no "
                       "distilling method)"}
  fc = r.cfg.finetune
  teacher, _, fmt = r.load(r.require(r.wd.teacher_model, "teacher"))
  graphdef, state = nnx.split(teacher)
  index, enc, drawn = drawn_alignment(r, fmt)
  examples = [r.sets.alignment()[i] for i in index]
  k, temperature = int(fc.kd_topk), float(fc.kd_temperature)
  rows: dict[str, list[np.ndarray]] = {"ids": [], "logp": [], "tail": [], "positions": []}
  offsets, covered = [0], []
  order = np.argsort([len(e.ids) for e in enc], kind="stable")
  out: dict[int, tuple] = {}
  for start in tqdm(range(0, len(order), BATCH), desc="teacher targets", unit="batch"):
    idx = order[start:start + BATCH]
    chunk = [enc[i] for i in idx]
    batch = pad_batch(chunk, bucket_length(max(len(e.ids) for e in chunk)), fmt.pad_id,
                      side="right", batch_size=BATCH)
    ids, logp, tail = jax.device_get(_targets(graphdef, state, jnp.asarray(batch["tokens"]),
                                              jnp.asarray(batch["attention_mask"]), k=k,
                                              temperature=temperature))
    for j, i in enumerate(idx):
      pos = target_positions(enc[i])
      out[i] = (pos, ids[j, pos], logp[j, pos], tail[j, pos])
  for i in range(len(enc)):
    pos, ids, logp, tail = out[i]
    for key, v in zip(("positions", "ids", "logp", "tail"), (pos, ids, logp, tail)):
      rows[key].append(v)
    offsets.append(offsets[-1] + len(pos))
    covered.append(np.exp(logp).sum(-1))
  write_npz(r.wd.distill_targets, example_ids=np.array([e.id for e in examples]),
            token_digest=np.array([_token_digest(e) for e in enc]),
            offsets=np.asarray(offsets, np.int64),
            **{k_: np.concatenate(v) for k_, v in rows.items()})
  mass = np.concatenate(covered) if covered else np.zeros(0)
  summary = {"examples": len(enc), "examples_of": drawn["of"],
             "align_rows_drawn": drawn["rows_needed"], "target_tokens": int(offsets[-1]), "k": k,
             "temperature": temperature, "top_k_mass_mean": float(mass.mean()),
             "top_k_mass_p05": float(np.percentile(mass, 5)),
             "truncated": int(sum(e.truncated for e in enc)), "max_len": int(fc.max_len)}
  write_json(r.wd.distill_summary, summary)
  log.info("teacher targets: %d of %d alignment examples (the finetune draws %d rows), %d target "
           "tokens, top-%d keeps %.1f%% of the teacher's mass on average", len(enc), drawn["of"],
           drawn["rows_needed"], offsets[-1], k, 100 * summary["top_k_mass_mean"])
  return summary


def target_positions(e: Encoded) -> np.ndarray:
  """The positions whose logits predict a response token (the next token is a target)."""
  mask = np.asarray(e.response_mask)
  return np.flatnonzero(mask[1:] > 0).astype(np.int32)


def _token_digest(e: Encoded) -> str:
  import hashlib
  return hashlib.sha256(np.asarray(e.ids, np.int32).tobytes()).hexdigest()


def dense_targets(r: Run, enc: Sequence[Encoded], example_ids: Sequence[str]
                  ) -> dict[str, list[np.ndarray]]:
  """Per alignment example, [n_tokens, k] / [n_tokens] target arrays (zeros off the targets) from
  distill/targets.npz; an example whose tokens differ from those the targets were made on is an
  error (the alignment data or its encoding changed: rerun `distill`)."""
  z = read_npz(r.require(r.wd.distill_targets, "distill"))
  index = {i: n for n, i in enumerate(z["example_ids"].tolist())}
  k = z["ids"].shape[-1]
  out: dict[str, list[np.ndarray]] = {"topk_ids": [], "topk_logp": [], "tail_logp": []}
  for e, eid in zip(enc, example_ids):
    n = index.get(eid)
    if n is None or z["token_digest"][n] != _token_digest(e):
      raise ValueError(f"{r.wd.distill_targets} has no targets for the current tokens of "
                       f"alignment example {eid!r}; rerun the `distill` stage (--force=distill)")
    a, b = z["offsets"][n], z["offsets"][n + 1]
    pos = z["positions"][a:b]
    ids = np.zeros((len(e.ids), k), np.int32)
    logp = np.zeros((len(e.ids), k), np.float32)
    tail = np.zeros((len(e.ids),), np.float32)
    ids[pos], logp[pos], tail[pos] = z["ids"][a:b], z["logp"][a:b], z["tail"][a:b]
    out["topk_ids"].append(ids)
    out["topk_logp"].append(logp)
    out["tail_logp"].append(tail)
  return out
