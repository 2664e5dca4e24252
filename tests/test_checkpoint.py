"""Checkpoints of a built state (`fit`) leave the frozen base weights out: a LoRA run's checkpoint
holds the adapters, their optimizer state, step and rng; resuming from it equals the run
uninterrupted; resuming on other base weights is refused; a checkpoint that holds every field (a
lazily built state's, or one from before frozen weights were left out) still restores."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from refjax.files import read_json
from refjax.method.losses import causal_lm_loss
from refjax.models import Decoder, ModelConfig
from refjax.parallel import make_mesh, make_rules
from refjax.parallel.plan import Parallel
from refjax.tools.train_tiny import synthetic_data
from refjax.training import checkpoint
from refjax.training.data import make_iterator
from refjax.training.fit import fit

CFG = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, lora_rank=4, lora_alpha=8.0,
                  lora_targets=("q_proj", "v_proj"))


def _plan() -> Parallel:
  return Parallel(make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                            devices=jax.local_devices()[:1]), make_rules())


def _stage(steps: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {"train": dict(steps=steps, batch_size=4, seed=0, log_every=1, eval_every=0,
                     checkpoint_every=2, max_to_keep=2, async_checkpoint=False,
                     progress_bar=False, keep_checkpoints=True),
       "optim": dict(lr=1e-2, schedule="constant", warmup_steps=0, end_lr_ratio=0.0, b1=0.9,
                     b2=0.999, eps=1e-8, weight_decay=0.0, no_decay=(), clip_norm=0.0,
                     grad_accum=1)})


def _fit(workdir, steps: int, base_seed: int = 0):
  plan = _plan()
  model = Decoder(CFG, rngs=nnx.Rngs(base_seed))
  data, sh = make_iterator(synthetic_data(16, 12, CFG.vocab_size, seed=0), plan, 4, 0)
  return fit(_stage(steps), workdir, model, causal_lm_loss, data, sh, plan)


def _params(model) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}


def test_lora_checkpoints_leave_the_base_weights_out_and_resume_exactly(tmp_path):
  whole, _ = _fit(tmp_path / "whole", 4)
  _, first = _fit(tmp_path / "cut", 2)
  meta = read_json(tmp_path / "cut/checkpoints/2/meta/metadata")
  assert "frozen" not in meta[checkpoint.SAVED] and len(meta[checkpoint.FROZEN_SUMS]) == 2
  resumed, result = _fit(tmp_path / "cut", 4)
  assert result.resumed_from == 2 and result.step == 4
  a, b = _params(whole), _params(resumed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  with pytest.raises(ValueError, match="other frozen weights"):
    _fit(tmp_path / "cut", 6, base_seed=1)  # another base model under the same adapters


def test_a_checkpoint_holding_every_field_restores(tmp_path):
  _, result = _fit(tmp_path / "run", 2)
  state = result.state
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  with ocp.CheckpointManager(tmp_path / "old") as manager:  # the layout saved before this module
    manager.save(2, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"train_state": state, "extras": {}}),
        meta=ocp.args.JsonSave({"step": 2})))
    manager.wait_until_finished()
    restored, _, meta = checkpoint.restore(manager, 2, abstract, None, {})
  assert meta == {"step": 2}
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
