"""The one weight-name table of the Llama family: our Decoder's parameter paths <-> transformers'
checkpoint names and layouts. Import (safetensors, GGUF) and export both read it.
"""

from __future__ import annotations

import dataclasses

Path_ = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """Where one parameter lives in an HF checkpoint: name (with `{i}` per layer) and layout."""

  name: str
  stacked: bool  # one HF tensor per layer, stacked on our leading [L] axis
  transpose: bool  # HF Linear weight [out, in] vs our kernel [in, out]

  def names(self, num_layers: int) -> list[str]:
    return [self.name.format(i=i) for i in range(num_layers)] if self.stacked else [self.name]

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one HF tensor given our parameter's shape."""
    s = shape[1:] if self.stacked else shape
    return tuple(reversed(s)) if self.transpose else tuple(s)


def hf_tensor_for(path: Path_) -> HFTensor | None:
  """The HF tensor behind a Decoder parameter path; None for LoRA adapters (not in checkpoints)."""
  if path[-1] in ("lora_a", "lora_b"):
    return None
  if path == ("embed_tokens",):
    return HFTensor("model.embed_tokens.weight", False, False)
  if path == ("lm_head",):
    return HFTensor("lm_head.weight", False, True)
  if path == ("norm", "scale"):
    return HFTensor("model.norm.weight", False, False)
  if path[0] == "layers":
    if len(path) == 3 and path[2] == "scale":  # input_layernorm / post_attention_layernorm
      return HFTensor(f"model.layers.{{i}}.{path[1]}.weight", True, False)
    if len(path) == 4 and path[3] in ("kernel", "bias"):
      kind = "weight" if path[3] == "kernel" else "bias"
      return HFTensor(f"model.layers.{{i}}.{path[1]}.{path[2]}.{kind}", True, path[3] == "kernel")
  raise ValueError(f"parameter {'/'.join(path)} has no HF checkpoint name; update hf_tensor_for")


__all__ = ["HFTensor", "hf_tensor_for", "Path_"]
