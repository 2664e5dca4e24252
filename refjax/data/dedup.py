"""Near-duplicate prompts across sources: normalised equality, containment (the shorter >= 25
characters) or token Jaccard >= 0.7, looked up through a token index."""

from __future__ import annotations

import re
from typing import Iterable

MIN_CONTAINED = 25  # characters a contained prompt must have to count as a copy


def norm_text(s: str) -> str:
  """ASSETS.md's normalisation: lowercase, collapse whitespace, strip, strip trailing .?!"""
  return re.sub(r"\s+", " ", s.lower()).strip().rstrip(".?!")


def _tokens(s: str) -> frozenset[str]:
  return frozenset(re.findall(r"\w+", s))


def near_duplicate(a: str, b: str, ta: frozenset | None = None, tb: frozenset | None = None,
                   jaccard: float = 0.7) -> bool:
  """a, b normalised: equal, one contains the other (>= 25 chars), or token Jaccard >= jaccard."""
  if a == b:
    return True
  short, long_ = (a, b) if len(a) <= len(b) else (b, a)
  if len(short) >= MIN_CONTAINED and short in long_:
    return True
  ta = ta if ta is not None else _tokens(a)
  tb = tb if tb is not None else _tokens(b)
  return bool(ta and tb) and len(ta & tb) / len(ta | tb) >= jaccard


class DupIndex:
  """Near-duplicate lookup against a fixed set of prompts (normalised text, token inverted index:
  containment with no shared token is impossible, so the candidates cover every rule)."""

  def __init__(self, texts: Iterable[str], jaccard: float = 0.7):
    self.jaccard = jaccard
    self.items = [(t, _tokens(t)) for t in {norm_text(x) for x in texts}]
    self.exact = {t for t, _ in self.items}
    self.by_token: dict[str, list[int]] = {}
    for i, (_, toks) in enumerate(self.items):
      for tok in toks:
        self.by_token.setdefault(tok, []).append(i)

  def hit(self, text: str) -> bool:
    t = norm_text(text)
    if t in self.exact:
      return True
    toks = _tokens(t)
    cand = {i for tok in toks for i in self.by_token.get(tok, ())}
    return any(near_duplicate(t, self.items[i][0], toks, self.items[i][1], self.jaccard)
               for i in cand)


__all__ = ["norm_text", "near_duplicate", "DupIndex", "MIN_CONTAINED"]
