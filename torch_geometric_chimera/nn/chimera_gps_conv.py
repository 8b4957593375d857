r"""``ChimeraGPSConv``: PyG's ``GPSConv`` with Chimera as the global model."""
import inspect
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Dropout, Linear, Sequential
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.inits import reset
from torch_geometric.nn.resolver import activation_resolver, normalization_resolver
from torch_geometric.typing import Adj

from .chimera_conv import ChimeraConv

# Keys of torch.nn.MultiheadAttention / PerformerAttention that have no Chimera counterpart.
_ATTENTION_ONLY_KEYS = {"bias", "add_bias_kv", "add_zero_attn", "kdim", "vdim", "batch_first", "kernel",
                        "qkv_bias", "attn_out_bias"}


class ChimeraGPSConv(torch.nn.Module):
    r"""The GraphGPS layer from `"Recipe for a General, Powerful, Scalable Graph Transformer"
    <https://arxiv.org/abs/2205.12454>`_ with :class:`ChimeraConv` in place of the Transformer,
    as in the LRGB experiments of "Chimera: State Space Models Beyond Sequences".

    It takes the same constructor arguments and the same call as
    :class:`torch_geometric.nn.conv.GPSConv`, so replacing ``GPSConv(...)`` by
    ``ChimeraGPSConv(...)`` is the only change a GPS model needs:

    .. math::
        \mathbf{h}_{\mathrm{local}} &= \mathrm{Norm}_1\big(\mathbf{x} +
            \mathrm{Dropout}(\mathrm{MPNN}(\mathbf{x}, \mathcal{E}))\big), \\
        \mathbf{h}_{\mathrm{global}} &= \mathrm{Norm}_2\big(\mathbf{x} +
            \mathrm{Dropout}(\mathrm{Chimera}(\mathbf{x}, \mathcal{E}, \mathbf{e}))\big), \\
        \mathbf{out} &= \mathrm{Norm}_3\big(\mathbf{h} + \mathrm{MLP}(\mathbf{h})\big), \qquad
            \mathbf{h} = \mathbf{h}_{\mathrm{local}} + \mathbf{h}_{\mathrm{global}}.

    Unlike attention, the global model sees the graph: it receives ``edge_index`` and, when it is
    passed, ``edge_attr`` (the same keyword the local MPNN gets). With a sparse adjacency,
    ``edge_attr`` follows its stored order (see :class:`ChimeraConv`).

    .. note::

        As :class:`~torch_geometric.nn.conv.GPSConv`, whose call it keeps, the layer cannot be
        compiled by :func:`torch.jit.script`: its ``forward`` takes ``**kwargs`` for the local MPNN,
        which TorchScript does not support. :class:`ChimeraConv` alone can be scripted.

    Args:
        channels (int): size of every input and output node feature.
        conv (MessagePassing, optional): the local message passing layer; :obj:`None` for none.
        heads (int, optional): number of Chimera SSM heads. (default: ``1``)
        dropout (float, optional): dropout after the local and global models and in the MLP.
            (default: ``0.0``)
        act (str or Callable, optional): the MLP's activation. (default: ``"relu"``)
        act_kwargs (Dict[str, Any], optional): arguments of ``act``. (default: :obj:`None`)
        norm (str or Callable, optional): normalization after each residual.
            (default: ``"batch_norm"``)
        norm_kwargs (Dict[str, Any], optional): arguments of ``norm``. (default: :obj:`None`)
        attn_type (str, optional): accepted so that code written for ``GPSConv`` runs unchanged;
            the global model is always Chimera. ``"chimera"``, ``"multihead"`` or ``"performer"``.
            (default: ``"chimera"``)
        attn_kwargs (Dict[str, Any], optional): arguments of :class:`ChimeraConv` (``state_dim``,
            ``expand``, ``edge_dim``, ``adjacency``, ``method``, ``num_terms``, ...). ``"dropout"``
            is the global branch's own dropout, as attention dropout is for ``GPSConv``.
            ``edge_dim`` defaults to ``channels``, the width that GPS models embed edge features
            to. (default: :obj:`None`)
        norm_style (str, optional): ``"post"``, GPSConv's order above, or ``"pre"``: each branch
            sees a normalized input, :math:`\mathbf{h} = \mathbf{x} + \mathrm{MPNN}(\mathrm{Norm}_1
            \mathbf{x}) + \mathrm{Chimera}(\mathrm{Norm}_2\mathbf{x})`, :math:`\mathbf{out} = \mathbf{h}
            + \mathrm{MLP}(\mathrm{Norm}_3\mathbf{h})` (the tuned LRGB configuration of the review
            discussion). (default: ``"post"``)

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F)`, edge indices :math:`(2, |\mathcal{E}|)`
          or a sparse adjacency, *(optional)* batch vector :math:`(|\mathcal{V}|)`,
          *(optional)* ``edge_attr`` :math:`(|\mathcal{E}|, D)` and further keyword arguments of
          ``conv``
        - **output:** node features :math:`(|\mathcal{V}|, F)`
    """

    def __init__(self, channels: int, conv: Optional[MessagePassing], heads: int = 1, dropout: float = 0.0,
                 act: str = "relu", act_kwargs: Optional[Dict[str, Any]] = None,
                 norm: Optional[str] = "batch_norm", norm_kwargs: Optional[Dict[str, Any]] = None,
                 attn_type: str = "chimera", attn_kwargs: Optional[Dict[str, Any]] = None,
                 norm_style: str = "post"):
        super().__init__()
        for name, value in (("channels", channels), ("heads", heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1], got {dropout}")
        if norm_style not in ("post", "pre"):
            raise ValueError(f"norm_style: expected 'post' or 'pre', got {norm_style!r}")
        if attn_type not in ("chimera", "multihead", "performer"):
            raise ValueError(f"attn_type: expected 'chimera' (or 'multihead' / 'performer', accepted for GPSConv "
                             f"compatibility), got {attn_type!r}")
        chimera_kwargs = dict(attn_kwargs or {})
        unsupported = sorted(_ATTENTION_ONLY_KEYS & chimera_kwargs.keys())
        if unsupported:
            raise ValueError(f"attn_kwargs: {unsupported} are attention options with no Chimera counterpart; "
                             f"pass ChimeraConv arguments (state_dim, expand, edge_dim, method, ...)")
        self.channels, self.conv, self.heads, self.dropout = channels, conv, heads, dropout
        self.attn_type, self.norm_style = attn_type, norm_style
        self.attn_dropout = float(chimera_kwargs.pop("dropout", 0.0))
        if not 0.0 <= self.attn_dropout <= 1.0:
            raise ValueError(f"attn_kwargs: 'dropout' must be a probability in [0, 1], got {self.attn_dropout}")
        chimera_kwargs.setdefault("edge_dim", channels)
        self.chimera = ChimeraConv(channels, heads=heads, **chimera_kwargs)

        self.mlp = Sequential(
            Linear(channels, channels * 2),
            activation_resolver(act, **(act_kwargs or {})),
            Dropout(dropout),
            Linear(channels * 2, channels),
            Dropout(dropout),
        )
        norm_kwargs = norm_kwargs or {}
        self.norm1 = normalization_resolver(norm, channels, **norm_kwargs)
        self.norm2 = normalization_resolver(norm, channels, **norm_kwargs)
        self.norm3 = normalization_resolver(norm, channels, **norm_kwargs)
        # PyG's graph-level norms (GraphNorm, InstanceNorm, ...) take the batch vector, and most of them
        # the number of graphs, which they otherwise read from it on the host.
        parameters = inspect.signature(self.norm1.forward).parameters if self.norm1 is not None else {}
        self.norm_with_batch = "batch" in parameters
        self.norm_with_batch_size = "batch_size" in parameters

    def reset_parameters(self):
        r"""Resets all learnable parameters of the module."""
        if self.conv is not None:
            self.conv.reset_parameters()
        self.chimera.reset_parameters()
        reset(self.mlp)
        for norm in (self.norm1, self.norm2, self.norm3):
            if norm is not None:
                norm.reset_parameters()

    def _norm(self, norm, h: Tensor, batch: Optional[Tensor], batch_size: Optional[int]) -> Tensor:
        if norm is None:
            return h
        if not self.norm_with_batch:
            return norm(h)
        if self.norm_with_batch_size:
            return norm(h, batch=batch, batch_size=batch_size)
        return norm(h, batch=batch)

    def forward(self, x: Tensor, edge_index: Adj, batch: Optional[Tensor] = None, *, batch_size: Optional[int] = None,
                **kwargs) -> Tensor:
        r"""Runs the layer; ``kwargs`` go to the local MPNN, and ``edge_attr`` also to Chimera.
        ``batch_size`` (the number of graphs, e.g. ``Batch.num_graphs``) goes to the graph-level
        norms, which read it from ``batch`` on the host when it is :obj:`None` (under
        :func:`torch.compile`, a graph break per norm)."""
        pre = self.norm_style == "pre"
        branches = []
        if self.conv is not None:  # local MPNN
            inp = self._norm(self.norm1, x, batch, batch_size) if pre else x
            h = F.dropout(self.conv(inp, edge_index, **kwargs), p=self.dropout, training=self.training)
            branches.append(h if pre else self._norm(self.norm1, h + x, batch, batch_size))

        edge_attr = kwargs.get("edge_attr")
        if edge_attr is not None and self.chimera.edge_proj is None:
            edge_attr = None  # built with attn_kwargs={'edge_dim': None}: the MPNN alone uses edge features
        inp = self._norm(self.norm2, x, batch, batch_size) if pre else x
        h = self.chimera(inp, edge_index, edge_attr, batch)  # global model
        h = F.dropout(h, p=self.attn_dropout, training=self.training)
        h = F.dropout(h, p=self.dropout, training=self.training)
        branches.append(h if pre else self._norm(self.norm2, h + x, batch, batch_size))

        if pre:
            out = x + sum(branches)
            return out + self.mlp(self._norm(self.norm3, out, batch, batch_size))
        out = sum(branches)
        return self._norm(self.norm3, out + self.mlp(out), batch, batch_size)

    def __repr__(self) -> str:
        # GPSConv's format; where it names the attention type, the global model here is always
        # Chimera, so the repr names what selects a Chimera variant: its adjacency and solve method.
        return (f"{self.__class__.__name__}({self.channels}, conv={self.conv}, heads={self.heads}, "
                f"adjacency={self.chimera.adjacency}, method={self.chimera.method})")
