"""Batched greedy decoding: refjax (jitted, KV cache) vs transformers' `generate`, same run.

Same model weights (the cached SmolLM2-135M-Instruct HF directory), same chat-templated prompts,
batch, prompt padding and number of new tokens; EOS is ignored on both sides so both produce
exactly `--new` tokens per row. Prints tokens/s of each and the ratio. No assertions.

  python benchmarks/generate.py [--model smollm2-135m-instruct] [--batch 8] [--new 64] [--reps 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer

from refjax.models.hub import resolve as resolve_model
from refjax.data.prompts import PromptConfig, PromptFormat, bucket_length, pad_batch
from refjax.evaluation.generation import timed
from refjax.models.decode import SamplingConfig, decode, unstack
from refjax.models.weights import load_hf_dir

PROMPTS = [
    "Give three tips for staying healthy.", "What is the capital of France?",
    "Write a haiku about the sea.", "Explain photosynthesis in one sentence.",
    "Name two prime numbers larger than ten.", "Describe a cat to someone who never saw one.",
    "How do rainbows form?", "Suggest a name for a bakery.",
]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--threads", type=int, default=2)
  args = ap.parse_args()
  from refjax.runtime import reexec_with_malloc_tuning
  reexec_with_malloc_tuning()  # both sides under the same malloc settings
  torch.set_num_threads(args.threads)

  path = resolve_model(args.model)
  tok = AutoTokenizer.from_pretrained(path)
  fmt = PromptFormat(tok, PromptConfig())
  prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[:args.batch]
  enc = [fmt.encode(p) for p in prompts]
  length = bucket_length(max(len(e.ids) for e in enc))
  batch = pad_batch(enc, length, fmt.pad_id, side="left")
  sampling = SamplingConfig(max_new_tokens=args.new)

  model, _ = load_hf_dir(path)
  graphdef, state = nnx.split(model)
  toks, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"])
  # As `Generator` does: the decode-loop weights are prepared once, like HF's model is loaded
  # once; `fresh` re-slices them inside every call (what a one-off `decode` call pays).
  prepared = jax.block_until_ready(unstack(graphdef, state))
  run = lambda u: decode(graphdef, state, toks, mask, jax.random.key(0), sampling=sampling,
                         stop_ids=(-1,), pad_id=fmt.pad_id, unstacked=u)  # -1: never stop early
  t0 = time.perf_counter()
  ours = jax.block_until_ready(run(prepared))
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(run(None))

  hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  tt, tm = torch.tensor(batch["tokens"]).long(), torch.tensor(batch["attention_mask"]).long()
  gen_kw = dict(attention_mask=tm, max_new_tokens=args.new, min_new_tokens=args.new,
                do_sample=False, pad_token_id=fmt.pad_id)

  # Interleaved repetitions, so a burst of load on this shared machine hits both sides alike.
  ours_t, fresh_t, hf_t = [], [], []
  with torch.no_grad():
    hf.generate(tt, **gen_kw)  # warm-up
    for _ in range(args.reps):
      ours, dt = timed(run, prepared)
      ours_t.append(dt)
      fresh_t.append(timed(run, None)[1])
      ref, dt = timed(hf.generate, tt, **gen_kw)
      hf_t.append(dt)

  new_tokens = args.batch * args.new
  ours_tps, hf_tps = new_tokens / min(ours_t), new_tokens / min(hf_t)
  fresh_tps = new_tokens / min(fresh_t)
  # HF's min_new_tokens suppresses EOS, so the two may differ after a row's first stop token:
  # compare each row up to (and including) our first stop token.
  ours_ids, ref_ids = np.asarray(ours[0]), ref[:, length:].numpy()
  matched = total = 0
  for o, r in zip(ours_ids, ref_ids):
    stops = np.flatnonzero(np.isin(o, fmt.eos_ids))
    n = int(stops[0]) + 1 if stops.size else len(o)
    matched += int(np.sum(o[:n] == r[:n]))
    total += n
  same = matched / total
  print(f"model={args.model} batch={args.batch} prompt_len={length} new={args.new} "
        f"threads={args.threads} jax={jax.__version__} torch={torch.__version__}")
  print(f"refjax  : {ours_tps:8.1f} new tokens/s (best of {args.reps}; first call incl. compile "
        f"{compile_s:.1f}s)")
  print(f"refjax* : {fresh_tps:8.1f} new tokens/s (best of {args.reps}; decode weights re-sliced "
        f"in every call, {fresh_tps / hf_tps:.2f}x hf)")
  print(f"hf      : {hf_tps:8.1f} new tokens/s (best of {args.reps})")
  print(f"ratio refjax/hf = {ours_tps / hf_tps:.2f}x ; greedy tokens identical up to each row's first stop token: {same:.1%}")


if __name__ == "__main__":
  main()
