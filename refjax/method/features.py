"""A model's last-prompt-token features streamed through jitted steps: the refusal feature of a
labelled prompt set, every prompt's cosine score, and raw features.

Batches are fixed-shape (`refjax.data.batches.prompt_batches`: padding rows carry `valid = 0`), the
model goes into jit as (graphdef, state), and sums are fp32, so one compile per length bucket
serves every batch and sharded states and batches just work. A batch with `prefix` (the leading
tokens all its prompts share) runs those once and every row continues from their keys/values.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from refjax.method.refusal import ClassSums, auroc, class_sums, cosine_scores, refusal_feature
from refjax.models.decode import prefix_cache

BATCH_KEYS = ("tokens", "attention_mask", "last_prompt_index", "valid")
OPTIONAL_KEYS = ("prefix",)  # the prompts' shared leading tokens, run once per batch

Batch = Mapping[str, np.ndarray | jax.Array]


def last_token_features(model: nnx.Module, tokens: jax.Array, attention_mask: jax.Array,
                        last_prompt_index: jax.Array, layers: tuple[int, ...] | None = None,
                        prefix: jax.Array | None = None) -> jax.Array:
  """Hidden states [L',B,D] (fp32) at each row's last prompt token; `layers` picks rows of L+1.
  With `prefix` [P], every row continues from those tokens (`prompt_batches(share_prefix=True)`)."""
  cache = None if prefix is None else prefix_cache(model, prefix, *tokens.shape)
  out = model(tokens, attention_mask, hidden_positions=last_prompt_index, return_logits=False,
              cache=cache)
  hidden = out.hidden.astype(jnp.float32)
  return hidden if layers is None else hidden[np.asarray(layers)]


def _batch_features(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch,
                    layers: tuple[int, ...] | None) -> jax.Array:
  model = nnx.merge(graphdef, state)
  return last_token_features(model, batch["tokens"], batch["attention_mask"],
                             batch["last_prompt_index"], layers, batch.get("prefix"))


@functools.partial(jax.jit, static_argnames=("graphdef", "layers"))
def batch_features(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch,
                   layers: tuple[int, ...] | None = None) -> jax.Array:
  """Features [L',B,D] fp32 of one padded batch (keys tokens, attention_mask, last_prompt_index)."""
  return _batch_features(graphdef, state, batch, layers)


@functools.partial(jax.jit, static_argnames=("graphdef", "layers"))
def accumulate_batch(graphdef: nnx.GraphDef, state: nnx.State, acc: ClassSums, batch: Batch,
                     layers: tuple[int, ...] | None = None) -> ClassSums:
  """acc + the class sums of one batch (needs `valid` [B] and `harmful` [B] besides the inputs)."""
  f = _batch_features(graphdef, state, batch, layers)
  return acc + class_sums(f, batch["valid"], batch["harmful"])


@functools.partial(jax.jit, static_argnames=("graphdef", "layers"))
def batch_scores(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch, feature: jax.Array,
                 layers: tuple[int, ...] | None = None) -> jax.Array:
  """Cosine scores [L',B] of one batch against feature [L',D] (rows of `layers`)."""
  return cosine_scores(_batch_features(graphdef, state, batch, layers), feature)


# ----------------------------------------------------------------------------------------------
# Drivers: stream host batches through the jitted steps.


def _progress(it: Sequence[Any] | Iterable[Any], desc: str, progress: bool, total: int | None):
  if not progress:
    return it
  from tqdm.auto import tqdm
  return tqdm(it, desc=desc, unit="batch", total=total)


def _device_batch(batch: Batch, keys: Sequence[str]) -> dict[str, jax.Array]:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"batch is missing {missing}; it has {sorted(batch)}")
  return {k: jnp.asarray(batch[k]) for k in (*keys, *OPTIONAL_KEYS) if k in batch}


def _layer_count(model: nnx.Module, layers: tuple[int, ...] | None) -> int:
  return model.cfg.num_layers + 1 if layers is None else len(layers)


def _check_layers(model: nnx.Module, layers: tuple[int, ...] | None) -> tuple[int, ...] | None:
  if layers is None:
    return None
  layers = tuple(int(l) for l in layers)
  n = model.cfg.num_layers + 1
  bad = [l for l in layers if not 0 <= l < n]
  if bad:
    raise ValueError(f"layers {bad} out of range; the model has hidden states 0..{n - 1}")
  return layers


def accumulate_class_sums(model: nnx.Module, batches: Iterable[Batch], *,
                          layers: Sequence[int] | None = None, progress: bool = True,
                          total: int | None = None) -> ClassSums:
  """Streams labelled batches (`harmful` [B], `valid` [B]) into fp32 per-class sums [L',D]."""
  layers = _check_layers(model, layers)
  graphdef, state = nnx.split(model)
  acc = ClassSums.zeros(_layer_count(model, layers), model.cfg.hidden_size)
  total = total if total is not None else (len(batches) if hasattr(batches, "__len__") else None)
  for batch in _progress(batches, "refusal feature", progress, total):
    acc = accumulate_batch(graphdef, state, acc, _device_batch(batch, BATCH_KEYS + ("harmful",)),
                           layers)
  return acc


def compute_refusal_feature(model: nnx.Module, batches: Iterable[Batch], *,
                            layers: Sequence[int] | None = None, progress: bool = True
                            ) -> tuple[jax.Array, ClassSums]:
  """Refusal feature [L',D] (default all L+1 layers) and the sums behind it; an empty class raises."""
  sums = accumulate_class_sums(model, batches, layers=layers, progress=progress)
  return _feature_of(sums), sums


def _feature_of(sums: ClassSums) -> jax.Array:
  """R from the class sums; an empty class raises."""
  n_h, n_n = int(sums.n_harmful), int(sums.n_harmless)
  if n_h == 0 or n_n == 0:
    raise ValueError(f"refusal feature needs both classes; got {n_h} harmful and {n_n} harmless "
                     "valid prompts")
  return refusal_feature(sums)


def _gather_rows(per_batch: list[tuple[np.ndarray, np.ndarray]], axis: int) -> np.ndarray:
  """Concatenates per-batch (values, index) along `axis` and restores the input order."""
  values = np.concatenate([v for v, _ in per_batch], axis=axis)
  index = np.concatenate([i for _, i in per_batch])
  if len(np.unique(index)) != len(index):
    raise ValueError("batches repeat an example index")
  return np.take(values, np.argsort(index, kind="stable"), axis=axis)


def _row_index(batch: Batch, offset: int) -> tuple[np.ndarray, np.ndarray]:
  """(valid-row mask, example index of each valid row); without `index` the stream order is used."""
  valid = np.asarray(batch["valid"]).astype(bool)
  if "index" in batch:
    return valid, np.asarray(batch["index"])[valid]
  return valid, offset + np.arange(int(valid.sum()))


def _per_row(batches: Iterable[Batch], fn, desc: str, progress: bool,
             total: int | None) -> np.ndarray:
  """fn(device batch) -> [L',B,...] for every batch, valid rows only, gathered in example order."""
  total = total if total is not None else (len(batches) if hasattr(batches, "__len__") else None)
  out, seen = [], 0
  for batch in _progress(batches, desc, progress, total):
    values = np.asarray(fn(_device_batch(batch, BATCH_KEYS)))
    valid, idx = _row_index(batch, seen)
    seen += len(idx)
    out.append((values[:, valid], idx))
  if not out:
    raise ValueError(f"{desc}: no batches")
  return _gather_rows(out, axis=1)


def extract_features(model: nnx.Module, batches: Iterable[Batch], *,
                     layers: Sequence[int] | None = None, progress: bool = True,
                     total: int | None = None, desc: str = "features") -> np.ndarray:
  """Features [L',N,D] (fp32 numpy) of every valid row, in example (`index`) or stream order."""
  layers = _check_layers(model, layers)
  graphdef, state = nnx.split(model)
  return _per_row(batches, lambda b: batch_features(graphdef, state, b, layers), desc,
                  progress, total)


def score_batches(model: nnx.Module, batches: Iterable[Batch], feature: np.ndarray | jax.Array, *,
                  layers: Sequence[int] | None = None, progress: bool = True,
                  total: int | None = None, desc: str = "scores") -> np.ndarray:
  """Cosine scores [L',N] of every valid row against feature [L',D], in example order."""
  layers = _check_layers(model, layers)
  feature = jnp.asarray(feature, jnp.float32)
  expect = (_layer_count(model, layers), model.cfg.hidden_size)
  if feature.shape != expect:
    raise ValueError(f"feature has shape {feature.shape}; expected {expect} for layers={layers}")
  graphdef, state = nnx.split(model)
  return _per_row(batches, lambda b: batch_scores(graphdef, state, b, feature, layers), desc,
                  progress, total)


@dataclasses.dataclass(frozen=True)
class Probe:
  """R [L+1,D] from the probe set and what it scores: the probe prompts' own cosines [L+1,N_p]
  with their labels, and the validation prompts' cosines [L+1,N_v] with the per-layer AUROC."""

  feature: np.ndarray
  sums: ClassSums
  probe_scores: np.ndarray
  probe_labels: np.ndarray
  val_scores: np.ndarray
  layer_auroc: list[float]


def probe(model: nnx.Module, probe_batches: Sequence[Batch], val_batches: Sequence[Batch],
          val_labels: np.ndarray, *, progress: bool = True) -> Probe:
  """One pass over the probe prompts (R and their own cosines from the same features) and one over
  the validation prompts, every layer."""
  feats = extract_features(model, probe_batches, progress=progress, desc="refusal feature")
  rows, seen = [], 0  # labels gathered in the features' example order
  for b in probe_batches:
    valid, idx = _row_index(b, seen)
    seen += len(idx)
    rows.append((np.asarray(b["harmful"])[valid], idx))
  labels = _gather_rows(rows, axis=0)
  sums = class_sums(jnp.asarray(feats), jnp.ones(len(labels)), jnp.asarray(labels))
  feature = np.asarray(_feature_of(sums))
  val_scores = score_batches(model, val_batches, feature, progress=progress,
                             desc="validation scores")
  return Probe(feature, sums, np.asarray(cosine_scores(jnp.asarray(feats), feature)), labels,
               val_scores, [float(auroc(s, val_labels)) for s in val_scores])


def probe_feature(model: nnx.Module, probe_batches: Sequence[Batch], val_batches: Sequence[Batch],
                  val_labels: np.ndarray, *, progress: bool = True
                  ) -> tuple[np.ndarray, ClassSums, list[float], np.ndarray]:
  """All-layer R [L+1,D] from the probe set, its sums, its per-layer AUROC on the validation set
  and the validation scores [L+1,N] behind them."""
  p = probe(model, probe_batches, val_batches, val_labels, progress=progress)
  return p.feature, p.sums, p.layer_auroc, p.val_scores


def model_hash(model: nnx.Module) -> str:
  """sha256 over every parameter's path, dtype, shape and bytes (identifies the scoring model)."""
  h = hashlib.sha256()
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for path, var in sorted(flat, key=lambda kv: tuple(str(p) for p in kv[0])):
    arr = np.asarray(jax.device_get(var[...]))
    h.update("/".join(str(p) for p in path).encode())
    h.update(f"{arr.dtype}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


__all__ = ["last_token_features", "batch_features", "accumulate_batch", "batch_scores",
           "accumulate_class_sums", "compute_refusal_feature", "extract_features",
           "score_batches", "Probe", "probe", "probe_feature", "model_hash", "BATCH_KEYS"]
