"""Near-duplicate prompts across sources: normalised equality, containment (the shorter >= 25
characters) or token Jaccard >= 0.7, looked up through a token index."""

from __future__ import annotations

import math
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
  """Near-duplicate lookup against a fixed set of prompts, exact for all three rules and fast on
  large sets: Jaccard candidates by prefix filtering (two token sets with Jaccard >= t share a
  token among each one's |x| - ceil(t |x|) + 1 rarest tokens), containment of a query in an item
  by one substring search over all items, and of an item in a query through the item's rarest
  interior token (every token but the first and last of a contained text is a query token)."""

  def __init__(self, texts: Iterable[str], jaccard: float = 0.7):
    self.jaccard = jaccard
    self.items = [(t, _tokens(t)) for t in sorted({norm_text(x) for x in texts})]
    self.exact = {t for t, _ in self.items}
    self.joined = "\n".join(t for t, _ in self.items)
    self.freq: dict[str, int] = {}
    for _, toks in self.items:
      for tok in toks:
        self.freq[tok] = self.freq.get(tok, 0) + 1
    self.by_prefix: dict[str, list[int]] = {}
    self.by_interior: dict[str, list[int]] = {}
    self.always: list[int] = []  # contained-capable items without interior tokens
    for i, (t, toks) in enumerate(self.items):
      for tok in self._prefix(toks):
        self.by_prefix.setdefault(tok, []).append(i)
      if len(t) >= MIN_CONTAINED:
        interior = re.findall(r"\w+", t)[1:-1]
        if interior:
          self.by_interior.setdefault(min(interior, key=self._rank), []).append(i)
        else:
          self.always.append(i)

  def _rank(self, tok: str) -> tuple[int, str]:
    return self.freq.get(tok, 0), tok

  def _prefix(self, toks: frozenset[str]) -> list[str]:
    ordered = sorted(toks, key=self._rank)
    return ordered[:len(ordered) - math.ceil(self.jaccard * len(ordered) - 1e-9) + 1]

  def hit(self, text: str) -> bool:
    t = norm_text(text)
    if t in self.exact or (len(t) >= MIN_CONTAINED and t in self.joined):
      return True
    toks = _tokens(t)
    cand = {i for tok in self._prefix(toks) for i in self.by_prefix.get(tok, ())}
    cand.update(i for tok in toks for i in self.by_interior.get(tok, ()))
    cand.update(self.always)
    return any(near_duplicate(t, self.items[i][0], toks, self.items[i][1], self.jaccard)
               for i in cand)


__all__ = ["norm_text", "near_duplicate", "DupIndex", "MIN_CONTAINED"]
