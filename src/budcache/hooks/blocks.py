"""Block contracts and the block stack: which modules the hooks go on, and how their streams are read.

A *block contract* says where a transformer block takes and returns its two
streams: the image (latent) stream ``h`` and the text (encoder) stream ``e``.
diffusers' ``TransformerBlockRegistry`` holds one for most block classes;
:data:`BLOCK_CONTRACTS` adds, as data, the classes it does not know yet.
Nothing is registered into diffusers: its classes and registry stay as they are.

:func:`block_stack` is budcache's one block finder: every module that needs
the blocks of a transformer (the hooks, the probes, the alignment's residual
tap, the compared methods) calls it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
from diffusers.hooks._helpers import TransformerBlockRegistry

from ..errors import ConfigError

__all__ = ["BLOCK_CONTRACTS", "ArgumentNames", "BlockContract", "block_contract", "block_stack"]


@dataclass(frozen=True)
class BlockContract:
    """Where one block class carries its streams.

    Args:
        hidden_out: index of ``h`` in the block's output tuple (ignored when the block returns a tensor).
        encoder_out: index of ``e`` in the output tuple; ``None``: the block returns ``h`` only
            (single-stream, or the text enters by cross-attention and is not updated).
        hidden_arg: name of the forward argument that takes ``h``.
        encoder_arg: name of the forward argument that takes ``e``.
        joined: the block takes and returns one stream that the model joined from the two streams of the
            blocks before it, ``cat([e, h], dim=1)`` (text tokens first, as FLUX.2's single-stream blocks);
            when such a block ends the stack, its output is split back into ``(e, h)`` by the text length
            the first block saw.
    """

    hidden_out: int = 0
    encoder_out: int | None = None
    hidden_arg: str = "hidden_states"
    encoder_arg: str = "encoder_hidden_states"
    joined: bool = False


#: Block contracts by class name, for classes diffusers' block registry (0.42.1) does not know or describes
#: wrongly; a row here wins over the registry. A new family whose blocks follow the one- or two-stream
#: pattern needs one row here and no hook code.
BLOCK_CONTRACTS: dict[str, BlockContract] = {
    # HunyuanVideo 1.5: block(hidden_states, encoder_hidden_states, temb, ...) -> (hidden_states, encoder_hidden_states)
    "HunyuanVideo15TransformerBlock": BlockContract(hidden_out=0, encoder_out=1),
    # Z-Image: block(x, attn_mask, freqs_cis, ...) -> x on the joint caption + image sequence (the registry
    # names the argument hidden_states)
    "ZImageTransformerBlock": BlockContract(hidden_out=0, encoder_out=None, hidden_arg="x"),
    # FLUX.2: the double-stream blocks return (e, h) (the registry has that right); then the model joins
    # cat([e, h], dim=1) and its single-stream blocks run on that one stream with encoder_hidden_states=None
    "Flux2SingleTransformerBlock": BlockContract(hidden_out=0, encoder_out=None, joined=True),
    # Bria: both block kinds return (encoder_hidden_states, hidden_states); the registry has output 0 as the
    # image stream for the double block and no row for the single block
    "BriaTransformerBlock": BlockContract(hidden_out=1, encoder_out=0),
    "BriaSingleTransformerBlock": BlockContract(hidden_out=1, encoder_out=0),
}


def block_contract(cls: type) -> BlockContract:
    """The contract of block class ``cls``: :data:`BLOCK_CONTRACTS` first, then diffusers' registry.

    The table is searched along ``cls``'s MRO, so a subclass of a listed block
    shares its row. Raises ``KeyError`` when neither knows the class.
    """
    for base in cls.__mro__:
        if base.__name__ in BLOCK_CONTRACTS:
            return BLOCK_CONTRACTS[base.__name__]
    try:
        meta = TransformerBlockRegistry.get(cls)
    except ValueError:
        raise KeyError(cls.__name__) from None
    return BlockContract(hidden_out=meta.return_hidden_states_index,
                         encoder_out=meta.return_encoder_hidden_states_index,
                         hidden_arg=meta.hidden_states_argument_name,
                         encoder_arg=meta.encoder_hidden_states_argument_name)


def block_stack(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The blocks of ``transformer`` in call order, as ``(name, module)`` pairs.

    Every ``ModuleList`` child whose name diffusers uses for block stacks
    (``transformer_blocks``, ``single_transformer_blocks``, ``blocks``,
    ``layers``, ...) contributes its entries, in the order the children were
    defined; every block must have a contract (:func:`block_contract`).

    Args:
        transformer: a diffusers transformer (the module itself, not a ``torch.compile`` wrapper).

    Raises:
        ConfigError: no such child, or a block class without a contract.
    """
    blocks: list[tuple[str, torch.nn.Module]] = []
    for name, sub in transformer.named_children():
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(sub, torch.nn.ModuleList):
            blocks += [(f"{name}.{i}", b) for i, b in enumerate(sub)]
    if not blocks:
        raise ConfigError(
            f"{type(transformer).__name__} has no block stack that budcache recognises "
            f"(expected a ModuleList named one of {sorted(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS)})")
    checked: set[type] = set()
    for name, b in blocks:
        if b.__class__ in checked:
            continue
        try:
            contract = block_contract(b.__class__)
        except KeyError:
            raise ConfigError(
                f"{type(transformer).__name__}: block {name} ({type(b).__name__}) is not in diffusers' "
                "transformer block registry, so budcache cannot cache it (a row in "
                "budcache.hooks.BLOCK_CONTRACTS declares its streams)") from None
        params = ArgumentNames(b.forward).names
        if contract.hidden_arg not in params:
            raise ConfigError(
                f"{type(transformer).__name__}: the block contract of {type(b).__name__} names the argument "
                f"{contract.hidden_arg!r} for the image stream, but its forward takes {params}")
        checked.add(b.__class__)
    return blocks


class ArgumentNames:
    """Maps a block's positional and keyword arguments to names, once per class."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.names = [p for p in inspect.signature(fn).parameters if p != "self"]

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        out = dict(zip(self.names, args))
        out.update(kwargs)
        return out
