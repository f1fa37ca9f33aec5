"""The block structure of a model: its repeated blocks (the ``ModuleList`` holding most of its
Linears, e.g. ``model.layers``), the parts before them (embeddings) and after them (the final norm,
the output head, MTP layers), and which names belong where.

Block-by-block calibration (:mod:`nvfp4kit.calibrate.blockwise`) walks a model in this order, and a
checkpoint's entries are written in it (:func:`BlockLayout.order`), so a model quantized whole in
memory and one quantized block by block from disk give the same files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..policy import EXPERTS_LIST


class StopForward(Exception):
    """Raised by a hook once the part of the model a pass needs has run: the rest is not computed."""


def repeated_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ``ModuleList`` of the model's repeated blocks: the one holding the most Linears (or, on a
    model whose experts are fused 3-D parameters, the most parameters), not an ``experts`` list; lists
    of two or more members first, a single-member list only when there is no longer one (a one-block
    model); None when the model has no such list."""
    best = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or not len(m) or name.rsplit(".", 1)[-1] == EXPERTS_LIST:
            continue
        n_linear = sum(isinstance(c, nn.Linear) for c in m.modules())
        key = (len(m) >= 2, n_linear)
        if n_linear and (best is None or key > best[2]):
            best = (name, m, key)
    return None if best is None else (best[0], best[1])


def block_members(names: list[str], blocks_name: str, n_blocks: int) -> tuple[list[list[str]], list[str]]:
    """Split module names into per-block lists (in model order) and the rest."""
    per_block: list[list[str]] = [[] for _ in range(n_blocks)]
    rest = []
    prefix = f"{blocks_name}." if blocks_name else ""
    for n in names:
        head, _, tail = n[len(prefix):].partition(".") if n.startswith(prefix) else ("", "", "")
        if head.isdigit() and tail and int(head) < n_blocks:
            per_block[int(head)].append(n)
        else:
            rest.append(n)
    return per_block, rest


@dataclass
class BlockLayout:
    """Where everything of a model lives relative to its repeated blocks.

    ``before`` / ``after``: the modules outside the blocks (the largest ones that contain no block),
    in model order, that come before / after the block list (embeddings; final norm, head, MTP).
    """

    name: str
    blocks: nn.ModuleList
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.blocks)

    def block_name(self, i: int) -> str:
        return f"{self.name}.{i}"

    def block_of(self, name: str) -> int | None:
        """The index of the block ``name`` lies in, or None."""
        prefix = f"{self.name}."
        if not name.startswith(prefix):
            return None
        head = name[len(prefix):].partition(".")[0]
        return int(head) if head.isdigit() and int(head) < len(self.blocks) else None

    def unit_of(self, name: str) -> tuple[int, str]:
        """``(rank, unit)`` of a module or state name: rank 0 before the blocks, ``1 + i`` in block i,
        ``1 + len`` after them; names of no known unit count as after."""
        i = self.block_of(name)
        if i is not None:
            return 1 + i, self.block_name(i)
        for unit in self.before:
            if name == unit or name.startswith(unit + "."):
                return 0, unit
        for unit in self.after:
            if name == unit or name.startswith(unit + "."):
                return 1 + len(self.blocks), unit
        return 1 + len(self.blocks), name

    def order(self, names) -> list[str]:
        """``names`` (state or module names, in model order) sorted by unit, stable within one."""
        names = list(names)
        return sorted(names, key=lambda n: self.unit_of(n)[0])


def block_layout(model: nn.Module) -> BlockLayout | None:
    """The :class:`BlockLayout` of ``model``, or None when it has no repeated blocks."""
    found = repeated_blocks(model)
    if found is None:
        return None
    name, blocks = found
    layout = BlockLayout(name, blocks)
    seen = False

    def walk(module: nn.Module, prefix: str) -> None:
        nonlocal seen
        for child_name, child in module.named_children():
            full = f"{prefix}{child_name}"
            if child is blocks:
                seen = True
            elif name.startswith(full + "."):
                walk(child, full + ".")
            else:
                (layout.after if seen else layout.before).append(full)

    walk(model, "")
    return layout


__all__ = ["BlockLayout", "StopForward", "block_layout", "block_members", "repeated_blocks"]
